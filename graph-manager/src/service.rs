//! The gRPC services and the shared, locked manager state behind them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use blkmesh_graph::{
    driver_name, raw_window_size, validate_export, validate_name, validate_node,
    validate_socket_path, GraphError, ObjectKind, SECTOR_SIZE,
};
use blkmesh_proto::v1::event::Kind as EventKind;
use blkmesh_proto::v1::export_service_server::ExportService;
use blkmesh_proto::v1::frontend_event::Event as FrontendEventKind;
use blkmesh_proto::v1::frontend_service_server::FrontendService;
use blkmesh_proto::v1::node_service_server::NodeService;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::worker_event::Event as WorkerEventKind;
use blkmesh_proto::v1::worker_service_server::WorkerService;
use blkmesh_proto::v1::Event;
use blkmesh_proto::v1::{
    AddExportRequest, AddExportResponse, AddNodeRequest, AddNodeResponse, DrainWorkerRequest,
    DrainWorkerResponse, ExportInfo, ExportPlan, ExportState, ExportStateEvent, ExportStatus,
    FrontendEvent, FrontendHello, FrontendInfo, GetNodeRequest, GetNodeResponse,
    ListExportsRequest, ListExportsResponse, ListFrontendsRequest, ListFrontendsResponse,
    ListNodesRequest, ListNodesResponse, ListWorkersRequest, ListWorkersResponse, MoveNodeRequest,
    MoveNodeResponse, MoveQueueRequest, MoveQueueResponse, MovedQueue, NodeInfo, NodeResizedEvent,
    NodeSpec, NodeUpdatedEvent, QueueAssignment, QueueEndpoint, RemoveExportRequest,
    RemoveExportResponse, RemoveNodeRequest, RemoveNodeResponse, ReportExportResponse,
    ResizeNodeRequest, ResizeNodeResponse, UpdateNodeRequest, UpdateNodeResponse,
    VhostUserBlkExport, WorkerAccepted, WorkerEvent, WorkerHello, WorkerInfo, WorkerState,
    ZoneCommand, ZoneCommandDone, ZoneCommandDoneResponse, ZoneInfo,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::checks::validate_node_limits;
use crate::error::ApiError;
use crate::reopen::{self, exports_over, replace_specs, ResizePlan};
use crate::state::{self, ExportRecord, State, WorkerRecord};
use crate::stats::{self as stats_mod, StatsStore};
use crate::zoned;

/// What a frontend answered to a zone command (`None`: no result set).
pub(crate) type ZoneAnswer = Option<blkmesh_proto::v1::zone_command_done::Result>;

/// A ZoneService call waiting for its frontend's `ZoneCommandDone`.
struct ZoneCall {
    frontend: String,
    done: oneshot::Sender<ZoneAnswer>,
}

/// The export a zone call is about, as the manager knows it.
#[derive(Debug, Clone)]
pub(crate) struct ZoneTarget {
    /// The export id.
    pub export: String,
    /// Zone geometry of the export's root node.
    pub info: ZoneInfo,
    /// The export's size in bytes (0: not known).
    pub size: u64,
    /// The connected frontend serving the export.
    pub frontend: String,
}

/// A zone command sent to a frontend; the wait for its answer. Dropping it
/// (the call was cancelled, or timed out) forgets the call.
pub(crate) struct PendingZoneCall<'a> {
    shared: &'a Shared,
    id: u64,
    rx: Option<oneshot::Receiver<ZoneAnswer>>,
    pub target: ZoneTarget,
}

impl Drop for PendingZoneCall<'_> {
    fn drop(&mut self) {
        self.shared.lock().zone_calls.remove(&self.id);
    }
}

impl PendingZoneCall<'_> {
    /// Waits (at most the apply timeout) for the frontend's answer.
    pub(crate) async fn answer(mut self) -> Result<ZoneAnswer, ApiError> {
        let Some(rx) = self.rx.take() else {
            return Err(ApiError::Internal("zone call answered twice".into()));
        };
        let timeout = self.shared.apply_timeout;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(ApiError::Unavailable(format!(
                "export {:?}: frontend {:?} went away (or the manager is stopping) before \
                 answering the zone command",
                self.target.export, self.target.frontend
            ))),
            Err(_) => Err(ApiError::Unavailable(format!(
                "export {:?}: no answer from frontend {:?} to the zone command within {} ms",
                self.target.export,
                self.target.frontend,
                timeout.as_millis()
            ))),
        }
    }
}

type EventTx<T> = mpsc::UnboundedSender<Result<T, Status>>;
/// A server-streaming response.
pub(crate) type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A registered frontend.
struct FrontendConn {
    session: u64,
    /// `None` once the frontend's stream is gone.
    tx: Option<EventTx<FrontendEvent>>,
}

/// Longest `ExportStatus.message` kept; longer ones are cut.
pub(crate) const MAX_REPORT_MESSAGE: usize = 1024;

/// A frontend's latest report on an export (memory only).
#[derive(Debug, Clone)]
struct Report {
    frontend: String,
    generation: u64,
    state: ExportState,
    message: String,
    /// Size in bytes the frontend serves (0 unless serving).
    size: u64,
}

/// Whether a report in `state` means the frontend has the graph open and
/// listens (a refused VMM does not change that).
fn serves(state: ExportState) -> bool {
    matches!(state, ExportState::Serving | ExportState::VmmRefused)
}

/// What the manager knows at run time about an export's serving state.
#[derive(Debug, Clone)]
struct ExportRuntime {
    /// The latest accepted report (of the export's current generation when
    /// it was accepted); dropped when its frontend goes away.
    report: Option<Report>,
    /// The state last announced with an `export_state` event.
    announced: ExportState,
}

impl Default for ExportRuntime {
    fn default() -> Self {
        ExportRuntime {
            report: None,
            announced: ExportState::Pending,
        }
    }
}

/// Everything behind the manager's lock.
struct Inner {
    state: State,
    /// Live workers: name → registration session.
    live_workers: BTreeMap<String, u64>,
    /// Known workers that are not registered, within their grace: name →
    /// the registration session that ended (0: not seen since the manager
    /// started). A grace timer runs for each.
    gone_since: BTreeMap<String, u64>,
    /// Workers whose grace ran out while no live worker could take their
    /// queues: reassigned when one registers.
    overdue: BTreeSet<String>,
    /// Frontends by name, alive (with a sender) or gone.
    frontends: BTreeMap<String, FrontendConn>,
    /// Serving state per export id.
    export_rt: BTreeMap<String, ExportRuntime>,
    /// ZoneService calls waiting for their frontend, by request id.
    zone_calls: BTreeMap<u64, ZoneCall>,
    /// Exports of the configuration file (normalized, checked) that wait
    /// for a worker to register, in file order: placed by the first
    /// registration (see [`Shared::place_config_exports`]).
    config_waiting: Vec<VhostUserBlkExport>,
    next_zone_request: u64,
    next_session: u64,
    shutting_down: bool,
}

impl Inner {
    fn frontend_connected(&self) -> bool {
        self.frontends.values().any(|c| c.tx.is_some())
    }

    /// The current report on `rec` if it says SERVING and its frontend is connected.
    fn serving_report(&self, rec: &ExportRecord) -> Option<&Report> {
        self.export_rt
            .get(&rec.export.id)
            .and_then(|rt| rt.report.as_ref())
            .filter(|r| r.generation == rec.generation && serves(r.state))
            .filter(|r| {
                self.frontends
                    .get(&r.frontend)
                    .is_some_and(|c| c.tx.is_some())
            })
    }

    /// ExportInfo.state and .message of an export.
    fn export_state(&self, rec: &ExportRecord) -> (ExportState, String) {
        if !self.frontend_connected() {
            return (ExportState::Pending, "no frontend connected".into());
        }
        let report = self
            .export_rt
            .get(&rec.export.id)
            .and_then(|rt| rt.report.as_ref())
            .filter(|r| r.generation == rec.generation);
        match report {
            Some(r) => (r.state, r.message.clone()),
            None => (
                ExportState::Pending,
                format!(
                    "waiting for the frontend to apply generation {}",
                    rec.generation
                ),
            ),
        }
    }
}

/// How an export ended up after a plan push (see [`Shared::wait_applied`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Applied {
    Serving,
    /// Reported PENDING, no report in time, or no frontend: the message says which.
    Pending(String),
    Failed(String),
    /// The export was removed meanwhile.
    Gone,
    /// The export moved on to a later generation meanwhile.
    Superseded,
}

/// The manager's state, shared by all services.
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    state_path: PathBuf,
    shutdown: watch::Sender<bool>,
    /// Latest stats report per source (memory only; own lock, never held
    /// together with `inner`).
    stats: Mutex<StatsStore>,
    /// The event feed (`StatsService.WatchEvents`).
    events: broadcast::Sender<Event>,
    /// How long a call waits for the frontends to apply a plan.
    apply_timeout: Duration,
    /// Bumped whenever an export report is accepted or a frontend leaves;
    /// callers waiting for a plan to be applied watch it.
    reports: watch::Sender<u64>,
    /// How long a worker that went away may take to come back before its
    /// queues are reassigned.
    worker_grace: Duration,
}

/// Worker counts for `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct WorkerCounts {
    pub alive: usize,
    pub gone: usize,
}

impl Shared {
    pub(crate) fn new(
        state: State,
        state_path: PathBuf,
        apply_timeout: Duration,
        worker_grace: Duration,
    ) -> Arc<Self> {
        let gone_since = state.workers.keys().map(|w| (w.clone(), 0)).collect();
        Arc::new(Shared {
            inner: Mutex::new(Inner {
                state,
                live_workers: BTreeMap::new(),
                gone_since,
                overdue: BTreeSet::new(),
                frontends: BTreeMap::new(),
                export_rt: BTreeMap::new(),
                zone_calls: BTreeMap::new(),
                config_waiting: Vec::new(),
                next_zone_request: 1,
                next_session: 1,
                shutting_down: false,
            }),
            state_path,
            shutdown: watch::channel(false).0,
            stats: Mutex::new(StatsStore::default()),
            events: stats_mod::event_channel(),
            apply_timeout,
            reports: watch::channel(0).0,
            worker_grace,
        })
    }

    /// The stats store.
    pub(crate) fn stats(&self) -> MutexGuard<'_, StatsStore> {
        // Every change to the store is a single insert or remove.
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends an event to every `WatchEvents` subscriber (none: dropped).
    pub(crate) fn emit(&self, kind: EventKind) {
        let _ = self.events.send(stats_mod::event(kind));
    }

    /// A receiver of every event from now on.
    pub(crate) fn subscribe_events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The configured exports (with their queue counts) and nodes.
    pub(crate) fn stats_config(&self) -> stats_mod::Config {
        let inner = self.lock();
        stats_mod::Config {
            exports: inner
                .state
                .exports
                .values()
                .map(|r| (r.export.id.clone(), r.export.num_queues))
                .collect(),
            nodes: inner.state.graph.iter().map(|s| s.name.clone()).collect(),
        }
    }

    /// Registered workers, alive and gone.
    pub(crate) fn worker_counts(&self) -> WorkerCounts {
        let inner = self.lock();
        let alive = inner
            .state
            .workers
            .keys()
            .filter(|w| inner.live_workers.contains_key(*w))
            .count();
        WorkerCounts {
            alive,
            gone: inner.state.workers.len() - alive,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-updated:
        // every change is built on a copy and swapped in whole.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Persists `next` and makes it the current state.
    fn commit(&self, inner: &mut Inner, next: State) -> Result<(), ApiError> {
        state::save(&self.state_path, &next).map_err(|source| ApiError::Persist {
            path: self.state_path.clone(),
            source,
        })?;
        inner.state = next;
        Ok(())
    }

    /// Ends every registration stream so the server can shut down.
    pub(crate) fn begin_shutdown(&self) {
        let mut inner = self.lock();
        inner.shutting_down = true;
        for conn in inner.frontends.values_mut() {
            conn.tx = None;
        }
        // Zone calls waiting for a frontend end at once (UNAVAILABLE).
        inner.zone_calls.clear();
        self.shutdown.send_replace(true);
        // Callers waiting for frontends stop waiting.
        self.reports.send_modify(|n| *n += 1);
    }

    /// A future that completes once shutdown has begun.
    pub(crate) fn shutdown_signal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.shutdown.subscribe();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    }

    fn broadcast(inner: &mut Inner, event: FrontendEventKind) {
        for (name, conn) in inner.frontends.iter_mut() {
            if let Some(tx) = &conn.tx {
                if tx
                    .send(Ok(FrontendEvent {
                        event: Some(event.clone()),
                    }))
                    .is_err()
                {
                    tracing::debug!(frontend = %name, "frontend stream closed while sending");
                }
            }
        }
    }

    fn worker_gone(self: &Arc<Self>, name: &str, session: u64) {
        let mut inner = self.lock();
        if inner.live_workers.get(name) == Some(&session) {
            inner.live_workers.remove(name);
            let queues = inner.state.queue_counts().get(name).copied().unwrap_or(0);
            tracing::info!(
                worker = %name,
                queues,
                grace_ms = self.worker_grace.as_millis() as u64,
                "worker gone"
            );
            self.emit(EventKind::WorkerLeft(name.to_string()));
            if !inner.shutting_down {
                inner.gone_since.insert(name.to_string(), session);
                drop(inner);
                self.spawn_grace_timer(name.to_string(), session);
            }
        }
    }

    /// Starts the grace timers of the workers known from the state file
    /// (call once the manager serves).
    pub(crate) fn arm_startup_timers(self: &Arc<Self>) {
        let waiting: Vec<String> = {
            let inner = self.lock();
            let counts = inner.state.queue_counts();
            inner
                .gone_since
                .iter()
                .filter(|(w, s)| **s == 0 && counts.get(w.as_str()).is_some_and(|n| *n > 0))
                .map(|(w, _)| w.clone())
                .collect()
        };
        for name in waiting {
            self.spawn_grace_timer(name, 0);
        }
    }

    /// After the grace, reassigns `name`'s queues unless it registered
    /// again (or went away again: a newer timer is then in charge).
    fn spawn_grace_timer(self: &Arc<Self>, name: String, session: u64) {
        let shared = Arc::clone(self);
        let grace = self.worker_grace;
        let mut shutdown = self.shutdown.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(grace) => shared.grace_expired(&name, session),
                _ = shutdown.wait_for(|v| *v) => {}
            }
        });
    }

    fn grace_expired(self: &Arc<Self>, name: &str, session: u64) {
        let mut inner = self.lock();
        if inner.shutting_down
            || inner.live_workers.contains_key(name)
            || inner.gone_since.get(name) != Some(&session)
        {
            return;
        }
        inner.gone_since.remove(name);
        tracing::info!(worker = %name, grace_ms = self.worker_grace.as_millis() as u64, "worker did not come back within its grace");
        inner.overdue.insert(name.to_string());
        self.reassign_overdue(&mut inner);
    }

    /// Moves every queue of the overdue workers to the live ones, persists
    /// and pushes the new plans. Without a live worker it waits (the next
    /// registration calls it again).
    fn reassign_overdue(self: &Arc<Self>, inner: &mut Inner) {
        let Inner {
            overdue,
            live_workers,
            ..
        } = &mut *inner;
        overdue.retain(|w| !live_workers.contains_key(w));
        if inner.overdue.is_empty() || inner.shutting_down {
            return;
        }
        let counts = inner.state.queue_counts();
        let stranded: usize = inner
            .overdue
            .iter()
            .map(|w| counts.get(w.as_str()).copied().unwrap_or(0))
            .sum();
        if stranded == 0 {
            inner.overdue.clear();
            return;
        }
        if inner.live_workers.is_empty() {
            tracing::warn!(
                workers = ?inner.overdue,
                queues = stranded,
                "no live worker to take the queues of the lost workers; \
                 waiting for a worker to register"
            );
            return;
        }
        let moved = plan_reassign(&inner.state, &inner.live_workers, &inner.overdue);
        let mut next = inner.state.clone();
        for m in &moved {
            if let Some(r) = next.exports.get_mut(&m.export) {
                r.queues[m.queue as usize] = m.to.clone();
            }
        }
        if let Err(e) = self.commit(inner, next) {
            // Tried again after another grace (a fresh timer under a session
            // no registration uses), or at the next registration.
            tracing::error!(workers = ?inner.overdue, "cannot reassign the queues of lost workers: {e}");
            let retry: Vec<String> = inner.overdue.iter().cloned().collect();
            for name in retry {
                inner.gone_since.insert(name.clone(), u64::MAX);
                self.spawn_grace_timer(name, u64::MAX);
            }
            return;
        }
        for m in &moved {
            tracing::info!(
                export = %m.export,
                queue = m.queue,
                from = %m.from,
                to = %m.to,
                "queue reassigned from a lost worker"
            );
        }
        let mut ids: Vec<&str> = moved.iter().map(|m| m.export.as_str()).collect();
        ids.dedup();
        tracing::info!(
            workers = ?inner.overdue,
            queues = moved.len(),
            exports = ids.len(),
            "lost workers' queues reassigned"
        );
        push_plans(inner, &ids);
        inner.overdue.clear();
    }

    fn frontend_gone(&self, name: &str, session: u64) {
        let mut inner = self.lock();
        let Some(conn) = inner.frontends.get_mut(name) else {
            return;
        };
        if conn.session != session || conn.tx.is_none() {
            return;
        }
        conn.tx = None;
        tracing::info!(frontend = %name, "frontend gone");
        // Its zone calls will never be answered: they fail now (UNAVAILABLE).
        inner.zone_calls.retain(|_, call| call.frontend != name);
        self.emit(EventKind::FrontendLeft(name.to_string()));
        // Its exports are pending until a frontend reports on them again.
        for rt in inner.export_rt.values_mut() {
            if rt.report.as_ref().is_some_and(|r| r.frontend == name) {
                rt.report = None;
            }
        }
        let ids: Vec<String> = inner.state.exports.keys().cloned().collect();
        self.announce(&mut inner, &ids);
        self.reports.send_modify(|n| *n += 1);
    }

    /// Emits an `export_state` event for each export in `ids` whose state
    /// (as ExportInfo shows it) differs from the one last announced.
    fn announce(&self, inner: &mut Inner, ids: &[String]) {
        for id in ids {
            let Some(rec) = inner.state.exports.get(id) else {
                continue;
            };
            let (state, message) = inner.export_state(rec);
            let rt = inner.export_rt.entry(id.clone()).or_default();
            if rt.announced != state {
                rt.announced = state;
                tracing::info!(export = %id, state = state.as_str_name(), %message, "export state");
                self.emit(EventKind::ExportState(ExportStateEvent {
                    export: id.clone(),
                    state: state as i32,
                    message,
                }));
            }
        }
    }

    /// A receiver that sees every report accepted from now on. Take it
    /// before pushing the plans to wait for.
    fn watch_reports(&self) -> watch::Receiver<u64> {
        self.reports.subscribe()
    }

    /// Waits (at most the apply timeout) until each `(export, generation)`
    /// in `targets` is reported on at that generation, or one of them
    /// failed. Returns immediately when no frontend is connected. `rx` must
    /// come from [`Shared::watch_reports`] taken before the plans were pushed.
    pub(crate) async fn wait_applied(
        &self,
        targets: &[(String, u64)],
        mut rx: watch::Receiver<u64>,
    ) -> BTreeMap<String, Applied> {
        let deadline = tokio::time::Instant::now() + self.apply_timeout;
        let mut out: BTreeMap<String, Applied> = BTreeMap::new();
        loop {
            {
                let inner = self.lock();
                let connected = inner.frontend_connected();
                for (id, generation) in targets {
                    if out.contains_key(id) {
                        continue;
                    }
                    let applied = if !connected {
                        Applied::Pending("no frontend connected".into())
                    } else {
                        match inner.state.exports.get(id) {
                            None => Applied::Gone,
                            Some(rec) if rec.generation != *generation => Applied::Superseded,
                            Some(_) => {
                                let report = inner
                                    .export_rt
                                    .get(id)
                                    .and_then(|rt| rt.report.as_ref())
                                    .filter(|r| r.generation == *generation);
                                match report {
                                    None => continue,
                                    Some(r) => match r.state {
                                        // A refused VMM does not undo the plan:
                                        // the graph is open and served.
                                        ExportState::Serving | ExportState::VmmRefused => {
                                            Applied::Serving
                                        }
                                        ExportState::Failed => Applied::Failed(r.message.clone()),
                                        ExportState::Pending | ExportState::Unspecified => {
                                            Applied::Pending(r.message.clone())
                                        }
                                    },
                                }
                            }
                        }
                    };
                    out.insert(id.clone(), applied);
                }
            }
            let failed = out.values().any(|a| matches!(a, Applied::Failed(_)));
            if failed || out.len() == targets.len() {
                return out;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives as long as `self`; treat its end as a timeout.
                Ok(Err(_)) | Err(_) => {
                    let ms = self.apply_timeout.as_millis();
                    for (id, _) in targets {
                        out.entry(id.clone()).or_insert_with(|| {
                            Applied::Pending(format!("no report from the frontend within {ms} ms"))
                        });
                    }
                    return out;
                }
            }
        }
    }
}

impl Shared {
    /// Starts a ZoneService call on export `export`: looks it up (NOT_FOUND),
    /// requires a zoned graph (FAILED_PRECONDITION), lets `check` validate the
    /// call against the export and build the command, requires a connected
    /// frontend serving the export (FAILED_PRECONDITION) and sends it the
    /// command with a fresh request id. Await the answer with
    /// [`PendingZoneCall::answer`].
    pub(crate) fn send_zone_command(
        &self,
        export: &str,
        check: impl FnOnce(&ZoneTarget) -> Result<ZoneCommand, ApiError>,
    ) -> Result<PendingZoneCall<'_>, ApiError> {
        let mut inner = self.lock();
        let rec = inner
            .state
            .exports
            .get(export)
            .ok_or_else(|| GraphError::NotFound {
                field: "export",
                kind: ObjectKind::Export,
                name: export.to_string(),
            })?;
        let root = &rec.export.node;
        let info =
            zoned::zone_info(&inner.state.graph, &inner.state.sizes, root).ok_or_else(|| {
                GraphError::precondition(
                    "export",
                    format!(
                        "export {export:?} is not zoned (its node {root:?} has no zones); \
                         zone commands need a graph with a zoned node"
                    ),
                )
            })?;
        // The frontend's latest SERVING report, of any generation: during a
        // reopen the old graph serves until the new one does.
        let serving = inner
            .export_rt
            .get(export)
            .and_then(|rt| rt.report.as_ref())
            .filter(|r| serves(r.state))
            .filter(|r| {
                inner
                    .frontends
                    .get(&r.frontend)
                    .is_some_and(|c| c.tx.is_some())
            });
        let size = match inner.state.sizes.get(root).copied().unwrap_or(0) {
            0 => serving.map(|r| r.size - r.size % SECTOR_SIZE).unwrap_or(0),
            n => n,
        };
        let mut target = ZoneTarget {
            export: export.to_string(),
            info,
            size,
            frontend: String::new(),
        };
        let mut command = check(&target)?;
        let Some(frontend) = serving.map(|r| r.frontend.clone()) else {
            return Err(GraphError::precondition(
                "export",
                format!("no frontend serves export {export:?}"),
            )
            .into());
        };
        let id = inner.next_zone_request;
        inner.next_zone_request += 1;
        command.request_id = id;
        command.export = export.to_string();
        let event = FrontendEvent {
            event: Some(FrontendEventKind::ZoneCommand(command)),
        };
        let sent = inner
            .frontends
            .get(&frontend)
            .and_then(|c| c.tx.as_ref())
            .is_some_and(|tx| tx.send(Ok(event)).is_ok());
        if !sent {
            return Err(ApiError::Unavailable(format!(
                "export {export:?}: frontend {frontend:?} went away"
            )));
        }
        let (done, rx) = oneshot::channel();
        inner.zone_calls.insert(
            id,
            ZoneCall {
                frontend: frontend.clone(),
                done,
            },
        );
        target.frontend = frontend;
        tracing::debug!(export = %export, frontend = %target.frontend, request_id = id, "zone command sent");
        Ok(PendingZoneCall {
            shared: self,
            id,
            rx: Some(rx),
            target,
        })
    }
}

impl Shared {
    /// Queues exports of the configuration file until a worker registers
    /// (call before serving; they were checked against the state).
    pub(crate) fn set_config_waiting(&self, exports: Vec<VhostUserBlkExport>) {
        if !exports.is_empty() {
            let ids: Vec<&str> = exports.iter().map(|e| e.id.as_str()).collect();
            tracing::info!(exports = ?ids, "exports of the configuration wait for the first worker to register");
        }
        self.lock().config_waiting = exports;
    }

    /// After `rec` was committed: logs it, starts its run-time state,
    /// announces it and pushes its plan to the frontends.
    fn export_added(&self, inner: &mut Inner, rec: &ExportRecord, from_config: bool) {
        tracing::info!(
            export = %rec.export.id,
            node = %rec.export.node,
            workers = ?rec.queues,
            from_config,
            "export added"
        );
        inner
            .export_rt
            .insert(rec.export.id.clone(), ExportRuntime::default());
        self.emit(EventKind::ExportAdded(rec.export.id.clone()));
        if let Some(plan) = export_plan(&inner.state, rec) {
            Shared::broadcast(inner, FrontendEventKind::Upsert(plan));
        }
    }

    /// Places the exports of the configuration file that wait for a worker
    /// (with at least one live worker), as AddExport would, marks them as
    /// from the configuration and persists them. One that no longer passes
    /// AddExport's checks (the state changed meanwhile) is dropped with an error
    /// in the log.
    fn place_config_exports(&self, inner: &mut Inner) {
        if inner.config_waiting.is_empty() || inner.live_workers.is_empty() {
            return;
        }
        let waiting = std::mem::take(&mut inner.config_waiting);
        let mut next = inner.state.clone();
        let mut added = Vec::new();
        for export in waiting {
            let placed = check_new_export(&next, &export).and_then(|export| {
                let queues = place_queues(&next, &inner.live_workers, &export)?;
                Ok(ExportRecord {
                    export,
                    queues,
                    generation: 1,
                })
            });
            match placed {
                Ok(rec) => {
                    next.config_exports.insert(rec.export.id.clone());
                    next.exports.insert(rec.export.id.clone(), rec.clone());
                    added.push(rec);
                }
                Err(e) => tracing::error!(
                    export = %export.id,
                    "cannot add the export of the configuration file: {e}; dropped \
                     (restart the manager to try again)"
                ),
            }
        }
        if added.is_empty() {
            return;
        }
        if let Err(e) = self.commit(inner, next) {
            tracing::error!(
                "cannot add the exports of the configuration file: {e}; \
                             trying again at the next worker registration"
            );
            inner.config_waiting = added.into_iter().map(|r| r.export).collect();
            return;
        }
        for rec in &added {
            self.export_added(inner, rec, true);
        }
    }
}

/// A committed node update or resize, kept to undo it.
struct NodeChange {
    /// (spec before, spec after) of each node whose spec changed.
    specs: Vec<(NodeSpec, NodeSpec)>,
    /// (name, size before, size after) of each node whose size changed.
    sizes: Vec<(String, u64, u64)>,
    /// The exports over the changed nodes, with their new generation.
    targets: Vec<(String, u64)>,
}

impl Shared {
    /// Bumps the generation of `exports` in `next`, commits it and pushes
    /// their plans (the caller then emits its events and [`Shared::announce`]s
    /// the exports, now pending). Returns each export with its new generation.
    fn commit_bumped(
        &self,
        inner: &mut Inner,
        mut next: State,
        exports: &[String],
    ) -> Result<Vec<(String, u64)>, ApiError> {
        let mut targets = Vec::with_capacity(exports.len());
        for id in exports {
            if let Some(rec) = next.exports.get_mut(id) {
                rec.generation += 1;
                targets.push((id.clone(), rec.generation));
            }
        }
        self.commit(inner, next)?;
        let ids: Vec<&str> = exports.iter().map(String::as_str).collect();
        push_plans(inner, &ids);
        Ok(targets)
    }

    /// Waits for the frontends to apply `change`; if one reports FAILED,
    /// undoes it and fails with the frontend's reason. Pending exports and
    /// timeouts do not fail.
    async fn settle(
        &self,
        rx: watch::Receiver<u64>,
        change: &NodeChange,
        what: String,
    ) -> Result<(), ApiError> {
        if change.targets.is_empty() {
            return Ok(());
        }
        let outcomes = self.wait_applied(&change.targets, rx).await;
        let failed = outcomes.into_iter().find_map(|(id, a)| match a {
            Applied::Failed(reason) => Some((id, reason)),
            _ => None,
        });
        let Some((export, reason)) = failed else {
            return Ok(());
        };
        tracing::warn!(%export, %reason, "frontend could not apply a node change; rolling back");
        let undone = match self.undo(change) {
            Ok(()) => "the change was rolled back".to_string(),
            Err(e) => format!("rolling the change back failed too: {e}"),
        };
        Err(ApiError::NotApplied {
            export,
            what,
            reason,
            undone,
        })
    }

    /// Restores the specs and sizes `change` replaced (those nobody changed
    /// since), bumping, pushing and persisting like the change itself.
    fn undo(&self, change: &NodeChange) -> Result<(), ApiError> {
        let mut inner = self.lock();
        let replace: BTreeMap<String, NodeSpec> = change
            .specs
            .iter()
            .filter(|(_, after)| inner.state.graph.get(&after.name) == Some(after))
            .map(|(before, _)| (before.name.clone(), before.clone()))
            .collect();
        let mut next = inner.state.clone();
        next.graph = replace_specs(&next.graph, &replace)?;
        let mut sizes = Vec::new();
        for (name, before, after) in &change.sizes {
            if next.sizes.get(name) == Some(after) {
                next.sizes.insert(name.clone(), *before);
                sizes.push((name.clone(), *after, *before));
            }
        }
        if replace.is_empty() && sizes.is_empty() {
            return Ok(());
        }
        if let Some(rec) = next
            .exports
            .values()
            .find(|r| r.export.writable && next.graph.is_read_only(&r.export.node).unwrap_or(false))
        {
            return Err(ApiError::Conflict(format!(
                "writable export {:?} was added meanwhile over a node the rollback would \
                 make read-only",
                rec.export.id
            )));
        }
        let touched = replace
            .keys()
            .map(String::as_str)
            .chain(sizes.iter().map(|(n, _, _)| n.as_str()));
        let exports = exports_over(&next, touched);
        self.commit_bumped(&mut inner, next, &exports)?;
        for node in replace.keys() {
            tracing::info!(%node, "node change rolled back");
            self.emit(EventKind::NodeUpdated(NodeUpdatedEvent {
                node: node.clone(),
                changes: vec!["rolled back".to_string()],
            }));
        }
        for (node, old, new) in sizes {
            self.emit(EventKind::NodeResized(NodeResizedEvent {
                node,
                old_size: old,
                new_size: new,
            }));
        }
        self.announce(&mut inner, &exports);
        Ok(())
    }
}

/// For a grouped throttle `spec` (the node's new spec), every other node of
/// its group as (current spec, spec with `spec`'s limits).
pub(crate) fn group_members_with(state: &State, spec: &NodeSpec) -> Vec<(NodeSpec, NodeSpec)> {
    let Some(Driver::Throttle(o)) = &spec.driver else {
        return Vec::new();
    };
    if o.group.is_empty() {
        return Vec::new();
    }
    state
        .graph
        .throttle_group(&o.group)
        .filter(|member| member.name != spec.name)
        .map(|member| {
            let mut new = member.clone();
            if let Some(Driver::Throttle(m)) = &mut new.driver {
                m.limits = o.limits;
            }
            (member.clone(), new)
        })
        .collect()
}

/// The `node_updated` change of a group member updated through `spec`.
pub(crate) fn group_change(spec: &NodeSpec) -> String {
    match &spec.driver {
        Some(Driver::Throttle(o)) => format!(
            "throttle limits (group {:?}, via node {:?})",
            o.group, spec.name
        ),
        _ => "throttle limits".to_string(),
    }
}

/// Refuses a state in which a writable export is over a read-only node;
/// the error is about `spec`'s read-only option.
pub(crate) fn check_writable_exports(next: &State, spec: &NodeSpec) -> Result<(), ApiError> {
    for rec in next.exports.values() {
        if rec.export.writable && next.graph.is_read_only(&rec.export.node)? {
            return Err(GraphError::precondition(
                reopen::read_only_field(spec),
                format!(
                    "writable export {:?} is over node {:?}, which would become read-only \
                     (remove the export, or add it read-only, first)",
                    rec.export.id, spec.name
                ),
            )
            .into());
        }
    }
    Ok(())
}

// ----- views -----

fn node_info(state: &State, spec: &NodeSpec) -> NodeInfo {
    let mut used_by: Vec<String> = state
        .graph
        .users_of(&spec.name)
        .into_iter()
        .map(str::to_string)
        .collect();
    used_by.extend(state.exports_of_node(&spec.name).map(str::to_string));
    NodeInfo {
        spec: Some(spec.clone()),
        size: state.sizes.get(&spec.name).copied().unwrap_or(0),
        read_only: state.graph.is_read_only(&spec.name).unwrap_or(false),
        used_by,
        zones: zoned::zone_info(&state.graph, &state.sizes, &spec.name),
    }
}

fn export_info(inner: &Inner, rec: &ExportRecord) -> ExportInfo {
    let state = &inner.state;
    let (export_state, message) = inner.export_state(rec);
    // Device leaves have no size until opened: then the serving frontend's.
    let size = match state.sizes.get(&rec.export.node).copied().unwrap_or(0) {
        0 => inner
            .serving_report(rec)
            .map(|r| r.size - r.size % SECTOR_SIZE)
            .unwrap_or(0),
        n => n,
    };
    ExportInfo {
        export: Some(rec.export.clone()),
        queues: rec
            .queues
            .iter()
            .enumerate()
            .map(|(i, w)| QueueAssignment {
                queue: i as u32,
                worker: w.clone(),
            })
            .collect(),
        size,
        state: export_state as i32,
        message,
    }
}

fn export_plan(state: &State, rec: &ExportRecord) -> Option<ExportPlan> {
    let nodes = match state.graph.subtree(&rec.export.node) {
        Ok(nodes) => nodes,
        Err(e) => {
            tracing::error!(export = %rec.export.id, "cannot build plan: {e}");
            return None;
        }
    };
    Some(ExportPlan {
        export: Some(rec.export.clone()),
        nodes,
        queues: rec
            .queues
            .iter()
            .enumerate()
            .map(|(i, w)| QueueEndpoint {
                queue: i as u32,
                worker: w.clone(),
                worker_socket: state
                    .workers
                    .get(w)
                    .map(|r| r.socket.clone())
                    .unwrap_or_default(),
            })
            .collect(),
        generation: rec.generation,
    })
}

/// Where the queues of the `lost` workers go: to the live workers (not
/// lost), least loaded first counting the moves so far, ties by name. The
/// lost queues of an export that is not spread stay together: on the live
/// worker that already serves most of its queues, else on the least loaded
/// one (as AddExport would place it). Spread exports move queue by queue.
fn plan_reassign(
    state: &State,
    live: &BTreeMap<String, u64>,
    lost: &BTreeSet<String>,
) -> Vec<MovedQueue> {
    let counts = state.queue_counts();
    let mut load: BTreeMap<String, usize> = live
        .keys()
        .filter(|w| !lost.contains(*w))
        .map(|w| (w.clone(), counts.get(w.as_str()).copied().unwrap_or(0)))
        .collect();
    // First minimum in name order: least loaded, ties by name.
    let least_loaded = |load: &BTreeMap<String, usize>| {
        load.iter().min_by_key(|(_, n)| **n).map(|(w, _)| w.clone())
    };
    let mut moved = Vec::new();
    for rec in state.exports.values() {
        let lost_queues: Vec<usize> = (0..rec.queues.len())
            .filter(|&i| lost.contains(&rec.queues[i]))
            .collect();
        if lost_queues.is_empty() {
            continue;
        }
        let together = if rec.export.spread_queues {
            None
        } else {
            let mut here: BTreeMap<&str, usize> = BTreeMap::new();
            for w in &rec.queues {
                if load.contains_key(w) {
                    *here.entry(w.as_str()).or_insert(0) += 1;
                }
            }
            // Most of the export's queues, then least loaded, then name.
            here.into_iter()
                .min_by_key(|(w, n)| (usize::MAX - n, load.get(*w).copied().unwrap_or(0), *w))
                .map(|(w, _)| w.to_string())
                .or_else(|| least_loaded(&load))
        };
        for i in lost_queues {
            let Some(to) = together.clone().or_else(|| least_loaded(&load)) else {
                return moved;
            };
            if let Some(n) = load.get_mut(&to) {
                *n += 1;
            }
            moved.push(MovedQueue {
                export: rec.export.id.clone(),
                queue: i as u32,
                from: rec.queues[i].clone(),
                to,
            });
        }
    }
    moved
}

/// Sends the current plan of each export in `ids` to the frontends.
fn push_plans(inner: &mut Inner, ids: &[&str]) {
    let plans: Vec<ExportPlan> = ids
        .iter()
        .filter_map(|id| inner.state.exports.get(*id))
        .filter_map(|r| export_plan(&inner.state, r))
        .collect();
    for plan in plans {
        Shared::broadcast(inner, FrontendEventKind::Upsert(plan));
    }
}

/// What a path turned out to be, for error messages.
fn file_kind(ft: &std::fs::FileType) -> &'static str {
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Size in bytes of a regular file or block device, rounded down to whole
/// sectors. Errors name `node.io_uring.path`.
fn probe_io_uring_path(path: &str) -> Result<u64, GraphError> {
    const FIELD: &str = "node.io_uring.path";
    let meta = std::fs::metadata(path)
        .map_err(|e| GraphError::invalid(FIELD, format!("cannot stat {path:?}: {e}")))?;
    let ft = meta.file_type();
    let size = if ft.is_file() {
        meta.len()
    } else if ft.is_block_device() {
        let mut f = File::open(path)
            .map_err(|e| GraphError::invalid(FIELD, format!("cannot open {path:?}: {e}")))?;
        f.seek(SeekFrom::End(0)).map_err(|e| {
            GraphError::invalid(FIELD, format!("cannot get the size of {path:?}: {e}"))
        })?
    } else {
        return Err(GraphError::invalid(
            FIELD,
            format!(
                "must be a regular file or block device ({path:?} is {})",
                file_kind(&ft)
            ),
        ));
    };
    Ok(size - size % SECTOR_SIZE)
}

/// What the path of a device-backed protocol node must be.
#[derive(Debug, Clone, Copy)]
enum DeviceKind {
    /// A character device (NVMe generic device, vhost-vdpa device).
    CharDevice,
    /// A listening unix socket (a vhost-user-blk target).
    Socket,
}

/// Checks that `path` exists and is a `kind`, without opening it: a
/// vhost-user target may serve a single connection, and opening a device
/// is the worker's job. Errors name `field`.
fn probe_device_path(field: &'static str, path: &str, kind: DeviceKind) -> Result<(), GraphError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| GraphError::invalid(field, format!("cannot stat {path:?}: {e}")))?;
    let ft = meta.file_type();
    let (ok, want) = match kind {
        DeviceKind::CharDevice => (ft.is_char_device(), "a character device"),
        DeviceKind::Socket => (ft.is_socket(), "a unix socket"),
    };
    if ok {
        Ok(())
    } else {
        Err(GraphError::invalid(
            field,
            format!("must be {want} ({path:?} is {})", file_kind(&ft)),
        ))
    }
}

/// Runs a filesystem probe off the async runtime.
async fn probe_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, GraphError> + Send + 'static,
) -> Result<T, ApiError> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??)
}

/// The filesystem checks of AddNode: an io_uring path must be a regular
/// file or block device (its size in whole sectors is returned), the other
/// device leaves' paths must exist and be what their driver opens, a zoned
/// node's metadata file must be creatable. Other nodes: `None`.
pub(crate) fn probe_node_paths(spec: &NodeSpec) -> Result<Option<u64>, GraphError> {
    match &spec.driver {
        Some(Driver::IoUring(o)) => probe_io_uring_path(&o.path).map(Some),
        Some(Driver::NvmeIoUring(o)) => {
            probe_device_path("node.nvme_io_uring.path", &o.path, DeviceKind::CharDevice)
                .map(|()| None)
        }
        Some(Driver::VirtioBlkVhostUser(o)) => probe_device_path(
            "node.virtio_blk_vhost_user.path",
            &o.path,
            DeviceKind::Socket,
        )
        .map(|()| None),
        Some(Driver::VirtioBlkVhostVdpa(o)) => probe_device_path(
            "node.virtio_blk_vhost_vdpa.path",
            &o.path,
            DeviceKind::CharDevice,
        )
        .map(|()| None),
        Some(Driver::Zoned(o)) => zoned::probe_metadata_path(&o.metadata_path).map(|()| None),
        None
        | Some(Driver::Null(_))
        | Some(Driver::Raw(_))
        | Some(Driver::Throttle(_))
        | Some(Driver::FaultInjection(_)) => Ok(None),
    }
}

/// The size in bytes of a node being added to `next` (whose sizes hold its
/// children's), with `probed` the size [`probe_node_paths`] found. 0 = not
/// known until a worker opens the node (NodeInfo.size).
pub(crate) fn new_node_size(
    next: &State,
    spec: &NodeSpec,
    probed: Option<u64>,
) -> Result<u64, ApiError> {
    let child_size = |child: &str| next.sizes.get(child).copied().unwrap_or(0);
    Ok(match &spec.driver {
        None => return Err(ApiError::Missing("node.driver")),
        Some(Driver::IoUring(_)) => probed.unwrap_or(0),
        Some(Driver::Null(o)) => o.size,
        Some(Driver::NvmeIoUring(_)) => 0,
        Some(Driver::VirtioBlkVhostUser(_)) => 0,
        Some(Driver::VirtioBlkVhostVdpa(_)) => 0,
        Some(Driver::Raw(o)) => match child_size(&o.child) {
            // The worker checks that the window fits when it opens the child.
            0 => o.size,
            n => raw_window_size(o, n)?,
        },
        Some(Driver::Throttle(o)) => child_size(&o.child),
        Some(Driver::FaultInjection(o)) => child_size(&o.child),
        Some(Driver::Zoned(o)) => zoned::zoned_size(o, child_size(&o.child)),
    })
}

// ----- NodeService -----

/// `blkmesh.v1.NodeService`.
pub(crate) struct NodeApi(pub Arc<Shared>);

impl NodeApi {
    async fn add(&self, spec: NodeSpec) -> Result<NodeInfo, ApiError> {
        validate_node(&spec)?;
        validate_node_limits(&spec)?;
        self.0.lock().state.graph.check_add(&spec)?;
        // Filesystem checks run before the lock is taken again; the graph
        // rules are checked once more under it.
        let probed = {
            let spec = spec.clone();
            probe_blocking(move || probe_node_paths(&spec)).await?
        };
        let mut inner = self.0.lock();
        let mut next = inner.state.clone();
        next.graph.add(spec.clone())?;
        zoned::check_add(&inner.state, &spec)?;
        let size = new_node_size(&next, &spec, probed)?;
        next.sizes.insert(spec.name.clone(), size);
        self.0.commit(&mut inner, next)?;
        tracing::info!(node = %spec.name, driver = driver_name(&spec), size, "node added");
        self.0.emit(EventKind::NodeAdded(spec.name.clone()));
        Ok(node_info(&inner.state, &spec))
    }

    fn remove(&self, name: &str) -> Result<(), ApiError> {
        let mut inner = self.0.lock();
        if !inner.state.graph.contains(name) {
            return Err(GraphError::NotFound {
                field: "name",
                kind: ObjectKind::Node,
                name: name.to_string(),
            }
            .into());
        }
        let mut users: Vec<String> = inner
            .state
            .graph
            .users_of(name)
            .iter()
            .map(|u| format!("node {u:?}"))
            .collect();
        users.extend(
            inner
                .state
                .exports_of_node(name)
                .map(|e| format!("export {e:?}")),
        );
        users.extend(
            inner
                .config_waiting
                .iter()
                .filter(|e| e.node == name)
                .map(|e| {
                    format!(
                        "export {:?} (from the configuration file, waiting for a worker)",
                        e.id
                    )
                }),
        );
        if !users.is_empty() {
            return Err(GraphError::InUse {
                kind: ObjectKind::Node,
                name: name.to_string(),
                users,
            }
            .into());
        }
        let mut next = inner.state.clone();
        next.graph.remove(name)?;
        next.sizes.remove(name);
        let from_config = next.config_nodes.remove(name);
        self.0.commit(&mut inner, next)?;
        if from_config {
            tracing::info!(node = %name, "node removed (it came from the configuration file: a start with that file adds it again)");
        } else {
            tracing::info!(node = %name, "node removed");
        }
        self.0.emit(EventKind::NodeRemoved(name.to_string()));
        Ok(())
    }

    /// `UpdateNode`: see the proto. New throttle limits of a node in a
    /// group apply to every node of the group (a group has one set of limits).
    async fn update(&self, spec: NodeSpec) -> Result<NodeInfo, ApiError> {
        validate_node(&spec)?;
        validate_node_limits(&spec)?;
        let rx = self.0.watch_reports();
        let (change, info) = self.commit_update(&spec)?;
        if let Some(change) = change {
            let what = format!("apply the update of node {:?}", spec.name);
            self.0.settle(rx, &change, what).await?;
        }
        Ok(info)
    }

    /// The locked part of `update`: checks, commits, pushes and announces
    /// the change (`None`: nothing changes).
    fn commit_update(&self, spec: &NodeSpec) -> Result<(Option<NodeChange>, NodeInfo), ApiError> {
        let mut inner = self.0.lock();
        let current =
            inner
                .state
                .graph
                .get(&spec.name)
                .cloned()
                .ok_or_else(|| GraphError::NotFound {
                    field: "node.name",
                    kind: ObjectKind::Node,
                    name: spec.name.clone(),
                })?;
        let changes = reopen::update_changes(&current, spec)?;
        if changes.is_empty() {
            return Ok((None, node_info(&inner.state, &current)));
        }
        let limits_changed = changes.iter().any(|c| c == "throttle limits");
        let mut specs = vec![(current, spec.clone())];
        let mut described = vec![(spec.name.clone(), changes)];
        if limits_changed {
            for (before, after) in group_members_with(&inner.state, spec) {
                described.push((after.name.clone(), vec![group_change(spec)]));
                specs.push((before, after));
            }
        }
        let replace: BTreeMap<String, NodeSpec> = specs
            .iter()
            .map(|(_, new)| (new.name.clone(), new.clone()))
            .collect();
        let mut next = inner.state.clone();
        next.graph = replace_specs(&next.graph, &replace)?;
        check_writable_exports(&next, spec)?;
        let exports = exports_over(&next, replace.keys().map(String::as_str));
        let targets = self.0.commit_bumped(&mut inner, next, &exports)?;
        for (node, changes) in described {
            tracing::info!(%node, ?changes, exports = ?exports, "node updated");
            self.0
                .emit(EventKind::NodeUpdated(NodeUpdatedEvent { node, changes }));
        }
        self.0.announce(&mut inner, &exports);
        let info = inner
            .state
            .graph
            .get(&spec.name)
            .map(|s| node_info(&inner.state, s))
            .unwrap_or_default();
        let change = NodeChange {
            specs,
            sizes: Vec::new(),
            targets,
        };
        Ok((Some(change), info))
    }

    /// `ResizeNode`: see the proto and [`reopen::plan_resize`].
    async fn resize(&self, name: &str, size: u64) -> Result<NodeInfo, ApiError> {
        if size == 0 || size % SECTOR_SIZE != 0 {
            return Err(GraphError::invalid(
                "size",
                format!("must be a non-zero multiple of {SECTOR_SIZE} (got {size})"),
            )
            .into());
        }
        let plan: ResizePlan = {
            let inner = self.0.lock();
            match reopen::plan_resize(&inner.state, name, size)? {
                Some(plan) => plan,
                None => {
                    let spec = inner.state.graph.get(name).ok_or_else(|| {
                        ApiError::Conflict(format!("node {name:?} was removed meanwhile"))
                    })?;
                    return Ok(node_info(&inner.state, spec));
                }
            }
        };
        // The file is extended (or the device re-read) outside the lock.
        let leaf_size = match &plan.leaf {
            Some(leaf) => {
                let leaf = leaf.clone();
                Some(probe_blocking(move || reopen::grow_io_uring_path(&leaf)).await?)
            }
            None => None,
        };
        let rx = self.0.watch_reports();
        let (change, info) = {
            let mut inner = self.0.lock();
            if reopen::plan_resize(&inner.state, name, size)?.as_ref() != Some(&plan) {
                return Err(ApiError::Conflict(format!(
                    "node {name:?} or a node below it changed while it was being resized; retry"
                )));
            }
            let replace: BTreeMap<String, NodeSpec> = plan
                .specs
                .iter()
                .map(|(_, new)| (new.name.clone(), new.clone()))
                .collect();
            let mut next = inner.state.clone();
            next.graph = replace_specs(&next.graph, &replace)?;
            let mut sizes = Vec::new();
            if let (Some(leaf), Some(new)) = (&plan.leaf, leaf_size) {
                let old = next.sizes.insert(leaf.node.clone(), new).unwrap_or(0);
                if old != new {
                    sizes.push((leaf.node.clone(), old, new));
                }
            }
            sizes.extend(reopen::recompute_sizes(&mut next, &plan.bottom)?);
            let touched = sizes
                .iter()
                .map(|(n, _, _)| n.as_str())
                .chain(replace.keys().map(String::as_str));
            let exports = exports_over(&next, touched);
            let new_size = next.sizes.get(name).copied().unwrap_or(0);
            let targets = self.0.commit_bumped(&mut inner, next, &exports)?;
            tracing::info!(node = %name, old = plan.old_size, new = new_size, exports = ?exports, "node resized");
            // The node asked for first, then the others that grew with it.
            self.0.emit(EventKind::NodeResized(NodeResizedEvent {
                node: name.to_string(),
                old_size: plan.old_size,
                new_size,
            }));
            for (node, old, new) in &sizes {
                if node != name {
                    self.0.emit(EventKind::NodeResized(NodeResizedEvent {
                        node: node.clone(),
                        old_size: *old,
                        new_size: *new,
                    }));
                }
            }
            self.0.announce(&mut inner, &exports);
            let info = inner
                .state
                .graph
                .get(name)
                .map(|s| node_info(&inner.state, s))
                .unwrap_or_default();
            let change = NodeChange {
                specs: plan.specs.clone(),
                sizes,
                targets,
            };
            (change, info)
        };
        self.0
            .settle(rx, &change, format!("apply the resize of node {name:?}"))
            .await?;
        Ok(info)
    }
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn add_node(
        &self,
        request: Request<AddNodeRequest>,
    ) -> Result<Response<AddNodeResponse>, Status> {
        let spec = request.into_inner().node.ok_or(ApiError::Missing("node"))?;
        let info = self.add(spec).await?;
        Ok(Response::new(AddNodeResponse { node: Some(info) }))
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        self.remove(&request.into_inner().name)?;
        Ok(Response::new(RemoveNodeResponse {}))
    }

    async fn list_nodes(
        &self,
        _request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let inner = self.0.lock();
        let nodes = inner
            .state
            .graph
            .iter()
            .map(|spec| node_info(&inner.state, spec))
            .collect();
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn get_node(
        &self,
        request: Request<GetNodeRequest>,
    ) -> Result<Response<GetNodeResponse>, Status> {
        let name = request.into_inner().name;
        let inner = self.0.lock();
        let spec = inner
            .state
            .graph
            .get(&name)
            .ok_or_else(|| GraphError::NotFound {
                field: "name",
                kind: ObjectKind::Node,
                name: name.clone(),
            })
            .map_err(ApiError::from)?;
        Ok(Response::new(GetNodeResponse {
            node: Some(node_info(&inner.state, spec)),
        }))
    }

    async fn update_node(
        &self,
        request: Request<UpdateNodeRequest>,
    ) -> Result<Response<UpdateNodeResponse>, Status> {
        let spec = request.into_inner().node.ok_or(ApiError::Missing("node"))?;
        let info = self.update(spec).await?;
        Ok(Response::new(UpdateNodeResponse { node: Some(info) }))
    }

    async fn resize_node(
        &self,
        request: Request<ResizeNodeRequest>,
    ) -> Result<Response<ResizeNodeResponse>, Status> {
        let r = request.into_inner();
        let info = self.resize(&r.name, r.size).await?;
        Ok(Response::new(ResizeNodeResponse { node: Some(info) }))
    }
}

// ----- ExportService -----

/// `blkmesh.v1.ExportService`.
pub(crate) struct ExportApi(pub Arc<Shared>);

impl ExportApi {
    /// Adds an export and pushes its plan: (id, generation).
    fn add(
        &self,
        export: &blkmesh_proto::v1::VhostUserBlkExport,
    ) -> Result<(String, u64), ApiError> {
        let export = validate_export(export)?;
        let mut inner = self.0.lock();
        check_waiting_conflict(&inner, &export)?;
        let export = check_new_export(&inner.state, &export)?;
        let queues = place_queues(&inner.state, &inner.live_workers, &export)?;
        let rec = ExportRecord {
            queues,
            export,
            generation: 1,
        };
        let mut next = inner.state.clone();
        next.exports.insert(rec.export.id.clone(), rec.clone());
        self.0.commit(&mut inner, next)?;
        self.0.export_added(&mut inner, &rec, false);
        Ok((rec.export.id.clone(), rec.generation))
    }

    /// Adds an export, then waits for a connected frontend to open it: an
    /// export the frontend fails to open is removed again.
    async fn add_and_wait(
        &self,
        export: &blkmesh_proto::v1::VhostUserBlkExport,
    ) -> Result<ExportInfo, ApiError> {
        let rx = self.0.watch_reports();
        let (id, generation) = self.add(export)?;
        let applied = self
            .0
            .wait_applied(&[(id.clone(), generation)], rx)
            .await
            .remove(&id)
            .unwrap_or(Applied::Gone);
        match applied {
            Applied::Failed(reason) => {
                match self.remove_if(&id, Some(generation)) {
                    Ok(()) => {}
                    // Removed meanwhile: the outcome is the same.
                    Err(ApiError::Graph(GraphError::NotFound { .. })) => {}
                    Err(e) => return Err(e),
                }
                tracing::warn!(export = %id, %reason, "frontend could not open the export; removed it");
                Err(ApiError::NotApplied {
                    export: id,
                    what: "open the graph".into(),
                    reason,
                    undone: "the export was removed".into(),
                })
            }
            Applied::Gone => Err(ApiError::Conflict(format!(
                "export {id:?} was removed while waiting for the frontend"
            ))),
            Applied::Serving | Applied::Pending(_) | Applied::Superseded => {
                let inner = self.0.lock();
                let rec = inner.state.exports.get(&id).ok_or_else(|| {
                    ApiError::Conflict(format!(
                        "export {id:?} was removed while waiting for the frontend"
                    ))
                })?;
                let mut info = export_info(&inner, rec);
                if let Applied::Pending(why) = applied {
                    if info.state == ExportState::Pending as i32 {
                        info.message = why;
                    }
                }
                Ok(info)
            }
        }
    }

    fn remove(&self, id: &str) -> Result<(), ApiError> {
        self.remove_if(id, None)
    }

    /// Removes export `id` (only at `generation`, if given).
    fn remove_if(&self, id: &str, generation: Option<u64>) -> Result<(), ApiError> {
        let mut inner = self.0.lock();
        let not_found = || GraphError::NotFound {
            field: "id",
            kind: ObjectKind::Export,
            name: id.to_string(),
        };
        match inner.state.exports.get(id) {
            None if generation.is_none() => {
                // An export of the configuration file still waiting for a worker.
                let before = inner.config_waiting.len();
                inner.config_waiting.retain(|e| e.id != id);
                if inner.config_waiting.len() == before {
                    return Err(not_found().into());
                }
                tracing::info!(export = %id, "export of the configuration file removed before a worker registered");
                self.0.emit(EventKind::ExportRemoved(id.to_string()));
                return Ok(());
            }
            None => return Err(not_found().into()),
            Some(rec) if generation.is_some_and(|g| g != rec.generation) => {
                return Err(not_found().into())
            }
            Some(_) => {}
        }
        let mut next = inner.state.clone();
        next.exports.remove(id);
        let from_config = next.config_exports.remove(id);
        self.0.commit(&mut inner, next)?;
        inner.export_rt.remove(id);
        if from_config {
            tracing::info!(export = %id, "export removed (it came from the configuration file: a start with that file adds it again)");
        } else {
            tracing::info!(export = %id, "export removed");
        }
        self.0.emit(EventKind::ExportRemoved(id.to_string()));
        Shared::broadcast(&mut inner, FrontendEventKind::Remove(id.to_string()));
        Ok(())
    }
}

#[tonic::async_trait]
impl ExportService for ExportApi {
    async fn add_export(
        &self,
        request: Request<AddExportRequest>,
    ) -> Result<Response<AddExportResponse>, Status> {
        let export = request
            .into_inner()
            .export
            .ok_or(ApiError::Missing("export"))?;
        let info = self.add_and_wait(&export).await?;
        Ok(Response::new(AddExportResponse { export: Some(info) }))
    }

    async fn remove_export(
        &self,
        request: Request<RemoveExportRequest>,
    ) -> Result<Response<RemoveExportResponse>, Status> {
        self.remove(&request.into_inner().id)?;
        Ok(Response::new(RemoveExportResponse {}))
    }

    async fn list_exports(
        &self,
        _request: Request<ListExportsRequest>,
    ) -> Result<Response<ListExportsResponse>, Status> {
        let inner = self.0.lock();
        let mut exports: Vec<ExportInfo> = inner
            .state
            .exports
            .values()
            .map(|r| export_info(&inner, r))
            .collect();
        // Exports of the configuration file that no worker could take yet.
        exports.extend(inner.config_waiting.iter().map(|e| ExportInfo {
            export: Some(e.clone()),
            queues: Vec::new(),
            size: inner.state.sizes.get(&e.node).copied().unwrap_or(0),
            state: ExportState::Pending as i32,
            message: "from the configuration file; waiting for a worker to register".into(),
        }));
        Ok(Response::new(ListExportsResponse { exports }))
    }
}

/// Refuses an API export whose id, socket or node is taken by an export of
/// the configuration file that waits for a worker.
fn check_waiting_conflict(inner: &Inner, export: &VhostUserBlkExport) -> Result<(), ApiError> {
    for w in &inner.config_waiting {
        if w.id == export.id {
            return Err(GraphError::AlreadyExists {
                field: "export.id",
                kind: ObjectKind::Export,
                name: export.id.clone(),
            }
            .into());
        }
        if w.socket == export.socket {
            return Err(GraphError::Duplicate {
                field: "export.socket",
                problem: format!(
                    "socket {:?} is already used by export {:?} (from the configuration \
                     file, waiting for a worker)",
                    export.socket, w.id
                ),
            }
            .into());
        }
        if w.node == export.node {
            return Err(GraphError::precondition(
                "export.node",
                format!(
                    "node {:?} is already exported by export {:?} (from the configuration \
                     file, waiting for a worker)",
                    export.node, w.id
                ),
            )
            .into());
        }
    }
    Ok(())
}

/// Every check AddExport makes of a new export against `state` but the
/// live workers: returns it normalized. Errors name the request field.
pub(crate) fn check_new_export(
    state: &State,
    export: &VhostUserBlkExport,
) -> Result<VhostUserBlkExport, ApiError> {
    let export = validate_export(export)?;
    if state.exports.contains_key(&export.id) {
        return Err(GraphError::AlreadyExists {
            field: "export.id",
            kind: ObjectKind::Export,
            name: export.id,
        }
        .into());
    }
    if let Some(other) = state
        .exports
        .values()
        .find(|r| r.export.socket == export.socket)
    {
        return Err(GraphError::Duplicate {
            field: "export.socket",
            problem: format!(
                "socket {:?} is already used by export {:?}",
                export.socket, other.export.id
            ),
        }
        .into());
    }
    if !state.graph.contains(&export.node) {
        return Err(GraphError::NotFound {
            field: "export.node",
            kind: ObjectKind::Node,
            name: export.node,
        }
        .into());
    }
    if let Some(other) = state.exports_of_node(&export.node).next() {
        return Err(GraphError::precondition(
            "export.node",
            format!(
                "node {:?} is already exported by export {other:?}",
                export.node
            ),
        )
        .into());
    }
    if export.writable && state.graph.is_read_only(&export.node)? {
        return Err(GraphError::precondition(
            "export.writable",
            format!(
                "node {:?} is read-only; a writable export needs a writable node",
                export.node
            ),
        )
        .into());
    }
    if let Some(zoned) = zoned::zoned_in_graph(&state.graph, &export.node) {
        if export.spread_queues {
            return Err(GraphError::precondition(
                "export.spread_queues",
                format!(
                    "node {zoned:?} is zoned: its zone state lives in the one worker \
                     that serves the export, so the queues cannot be spread"
                ),
            )
            .into());
        }
    }
    if export.spread_queues {
        if let Some(node) =
            state.graph.subtree(&export.node)?.iter().find(
                |spec| matches!(&spec.driver, Some(Driver::Throttle(o)) if o.group.is_empty()),
            )
        {
            return Err(GraphError::precondition(
                "export.spread_queues",
                format!(
                    "node {:?} is a throttle without a group: its buckets are per \
                     worker, so spreading the queues would multiply its limits \
                     (give it a group, or do not spread)",
                    node.name
                ),
            )
            .into());
        }
    }
    if let Some((other, zoned)) = zoned::zoned_overlap(state, &export.node, &export.id) {
        return Err(GraphError::precondition(
            "export.node",
            format!(
                "node {:?} shares nodes with the graph of export {other:?}, and zoned node \
                 {zoned:?} is among them or below: a zoned node's graph is served by one \
                 export only",
                export.node
            ),
        )
        .into());
    }
    Ok(export)
}

/// The worker of each queue of a new export: all on the live worker with
/// the fewest queues (ties by name), or round robin over the live workers
/// in that order when the export spreads its queues.
fn place_queues(
    state: &State,
    live_workers: &BTreeMap<String, u64>,
    export: &VhostUserBlkExport,
) -> Result<Vec<String>, ApiError> {
    let counts = state.queue_counts();
    let mut live: Vec<(usize, &String)> = live_workers
        .keys()
        .map(|w| (counts.get(w.as_str()).copied().unwrap_or(0), w))
        .collect();
    live.sort();
    if live.is_empty() {
        return Err(ApiError::NoLiveWorker);
    }
    let n = export.num_queues as usize;
    Ok(if export.spread_queues {
        (0..n).map(|i| live[i % live.len()].1.clone()).collect()
    } else {
        vec![live[0].1.clone(); n]
    })
}

// ----- WorkerService -----

/// `blkmesh.v1.WorkerService`.
pub(crate) struct WorkerApi(pub Arc<Shared>);

impl WorkerApi {
    fn register(&self, hello: WorkerHello) -> Result<EventStream<WorkerEvent>, ApiError> {
        validate_name("name", &hello.name)?;
        validate_socket_path("socket", &hello.socket)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let session = {
            let mut inner = self.0.lock();
            if inner.shutting_down {
                return Err(ApiError::ShuttingDown);
            }
            if inner.live_workers.contains_key(&hello.name) {
                return Err(ApiError::AlreadyRegistered {
                    kind: "worker",
                    name: hello.name,
                });
            }
            let record = WorkerRecord {
                socket: hello.socket.clone(),
                pid: hello.pid,
            };
            let previous = inner.state.workers.get(&hello.name).cloned();
            if previous.as_ref() != Some(&record) {
                let mut next = inner.state.clone();
                next.workers.insert(hello.name.clone(), record);
                self.0.commit(&mut inner, next)?;
            }
            let session = inner.next_session;
            inner.next_session += 1;
            inner.live_workers.insert(hello.name.clone(), session);
            inner.gone_since.remove(&hello.name);
            inner.overdue.remove(&hello.name);
            tracing::info!(worker = %hello.name, socket = %hello.socket, pid = hello.pid, "worker registered");
            self.0.emit(EventKind::WorkerJoined(hello.name.clone()));
            // Send `accepted` before any other event could be queued.
            let _ = tx.send(Ok(WorkerEvent {
                event: Some(WorkerEventKind::Accepted(WorkerAccepted {})),
            }));
            if previous.is_some_and(|p| p.socket != hello.socket) {
                let plans: Vec<ExportPlan> = inner
                    .state
                    .exports
                    .values()
                    .filter(|r| r.queues.contains(&hello.name))
                    .filter_map(|r| export_plan(&inner.state, r))
                    .collect();
                for plan in plans {
                    Shared::broadcast(&mut inner, FrontendEventKind::Upsert(plan));
                }
            }
            // Workers whose grace ran out with nobody to take their queues.
            self.0.reassign_overdue(&mut inner);
            // Exports of the configuration file waiting for a worker.
            self.0.place_config_exports(&mut inner);
            session
        };
        let shared = self.0.clone();
        let name = hello.name;
        let mut shutdown = self.0.shutdown.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = tx.closed() => {}
                _ = shutdown.wait_for(|v| *v) => {}
            }
            drop(tx);
            shared.worker_gone(&name, session);
        });
        Ok(Box::pin(UnboundedReceiverStream::new(rx)))
    }

    /// Moves queue `queue` of export `id` to `worker` (a live worker).
    fn move_queue(&self, id: &str, queue: u32, worker: &str) -> Result<ExportInfo, ApiError> {
        let mut inner = self.0.lock();
        let rec = inner
            .state
            .exports
            .get(id)
            .ok_or_else(|| GraphError::NotFound {
                field: "export",
                kind: ObjectKind::Export,
                name: id.to_string(),
            })?;
        let num_queues = rec.export.num_queues;
        if queue >= num_queues {
            return Err(GraphError::invalid(
                "queue",
                format!("export {id:?} has {num_queues} queues (0..{num_queues}); got {queue}"),
            )
            .into());
        }
        Self::check_target(&inner, worker)?;
        let from = rec.queues[queue as usize].clone();
        if from == worker {
            return Ok(export_info(&inner, rec));
        }
        if let Some(zoned) = zoned::zoned_in_graph(&inner.state.graph, &rec.export.node) {
            let split = rec
                .queues
                .iter()
                .enumerate()
                .find(|(i, w)| *i != queue as usize && w.as_str() != worker);
            if let Some((i, other)) = split {
                return Err(GraphError::precondition(
                    "queue",
                    format!(
                        "export {id:?} is over zoned node {zoned:?}: its queues stay on one \
                         worker (queue {i} is on {other:?}); move them all with MoveNode \
                         (blkmeshctl node move {} {worker})",
                        rec.export.node
                    ),
                )
                .into());
            }
        }
        let mut next = inner.state.clone();
        if let Some(r) = next.exports.get_mut(id) {
            r.queues[queue as usize] = worker.to_string();
        }
        self.0.commit(&mut inner, next)?;
        tracing::info!(export = %id, queue, %from, to = %worker, "queue moved");
        push_plans(&mut inner, &[id]);
        let rec = &inner.state.exports[id];
        Ok(export_info(&inner, rec))
    }

    /// Checks that `worker` is known and alive, as a move destination.
    fn check_target(inner: &Inner, worker: &str) -> Result<(), ApiError> {
        if !inner.state.workers.contains_key(worker) {
            return Err(ApiError::UnknownWorker {
                field: "worker",
                name: worker.to_string(),
            });
        }
        if !inner.live_workers.contains_key(worker) {
            return Err(GraphError::precondition(
                "worker",
                format!("worker {worker:?} is not alive; queues can only move to a live worker"),
            )
            .into());
        }
        Ok(())
    }

    /// Moves every queue of every export whose graph contains `node` to
    /// `worker` (a live worker). Queues already there are not listed.
    fn move_node(&self, node: &str, worker: &str) -> Result<Vec<MovedQueue>, ApiError> {
        let mut inner = self.0.lock();
        if !inner.state.graph.contains(node) {
            return Err(GraphError::NotFound {
                field: "node",
                kind: ObjectKind::Node,
                name: node.to_string(),
            }
            .into());
        }
        Self::check_target(&inner, worker)?;
        // `node` and everything above it: an export's graph contains `node`
        // iff its root is one of these.
        let mut above: BTreeSet<&str> = BTreeSet::new();
        let mut stack = vec![node];
        while let Some(name) = stack.pop() {
            if above.insert(name) {
                stack.extend(inner.state.graph.users_of(name));
            }
        }
        let moved: Vec<MovedQueue> = inner
            .state
            .exports
            .values()
            .filter(|r| above.contains(r.export.node.as_str()))
            .flat_map(|r| {
                r.queues
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| w.as_str() != worker)
                    .map(|(i, from)| MovedQueue {
                        export: r.export.id.clone(),
                        queue: i as u32,
                        from: from.clone(),
                        to: worker.to_string(),
                    })
            })
            .collect();
        if moved.is_empty() {
            return Ok(moved);
        }
        let mut next = inner.state.clone();
        for m in &moved {
            if let Some(r) = next.exports.get_mut(&m.export) {
                r.queues[m.queue as usize] = worker.to_string();
            }
        }
        self.0.commit(&mut inner, next)?;
        let mut ids: Vec<&str> = moved.iter().map(|m| m.export.as_str()).collect();
        ids.dedup();
        tracing::info!(%node, to = %worker, queues = moved.len(), exports = ids.len(), "node moved");
        push_plans(&mut inner, &ids);
        Ok(moved)
    }

    /// Moves every queue off `worker` to the least loaded other live workers.
    fn drain(&self, worker: &str) -> Result<Vec<MovedQueue>, ApiError> {
        let mut inner = self.0.lock();
        if !inner.state.workers.contains_key(worker) {
            return Err(ApiError::UnknownWorker {
                field: "worker",
                name: worker.to_string(),
            });
        }
        let on_worker: Vec<(String, usize)> = inner
            .state
            .exports
            .values()
            .flat_map(|r| {
                r.queues
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| w.as_str() == worker)
                    .map(|(i, _)| (r.export.id.clone(), i))
            })
            .collect();
        if on_worker.is_empty() {
            return Ok(Vec::new());
        }
        let counts = inner.state.queue_counts();
        let mut targets: Vec<(usize, String)> = inner
            .live_workers
            .keys()
            .filter(|w| w.as_str() != worker)
            .map(|w| (counts.get(w.as_str()).copied().unwrap_or(0), w.clone()))
            .collect();
        if targets.is_empty() {
            return Err(GraphError::precondition(
                "worker",
                format!(
                    "no other live worker to take the {} queues of worker {worker:?}",
                    on_worker.len()
                ),
            )
            .into());
        }
        let mut next = inner.state.clone();
        let mut moved = Vec::with_capacity(on_worker.len());
        // Exports over a zoned node move whole: export → its one target.
        let mut whole: BTreeMap<String, String> = BTreeMap::new();
        for (id, queue) in on_worker {
            let zoned_rec =
                inner.state.exports.get(&id).filter(|r| {
                    zoned::zoned_in_graph(&inner.state.graph, &r.export.node).is_some()
                });
            let pinned = match (whole.get(&id), zoned_rec) {
                (Some(to), _) => Some(to.clone()),
                // Where its other queues are, if that is a target (they
                // should all be on `worker`); else the least loaded.
                (None, Some(r)) => r
                    .queues
                    .iter()
                    .find(|w| targets.iter().any(|(_, t)| t == *w))
                    .cloned()
                    .or_else(|| targets.iter().min().map(|(_, t)| t.clone())),
                (None, None) => None,
            };
            let target = match &pinned {
                Some(to) => targets.iter_mut().find(|(_, t)| t == to),
                // Least loaded first, counting the queues moved so far; ties by name.
                None => targets.iter_mut().min(),
            };
            let Some(target) = target else {
                break;
            };
            target.0 += 1;
            let to = target.1.clone();
            if zoned_rec.is_some() {
                whole.insert(id.clone(), to.clone());
            }
            if let Some(r) = next.exports.get_mut(&id) {
                r.queues[queue] = to.clone();
            }
            moved.push(MovedQueue {
                export: id,
                queue: queue as u32,
                from: worker.to_string(),
                to,
            });
        }
        self.0.commit(&mut inner, next)?;
        let mut ids: Vec<&str> = moved.iter().map(|m| m.export.as_str()).collect();
        ids.dedup();
        tracing::info!(%worker, queues = moved.len(), exports = ids.len(), "worker drained");
        push_plans(&mut inner, &ids);
        Ok(moved)
    }
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    type RegisterStream = EventStream<WorkerEvent>;

    async fn register(
        &self,
        request: Request<WorkerHello>,
    ) -> Result<Response<Self::RegisterStream>, Status> {
        Ok(Response::new(WorkerApi::register(
            self,
            request.into_inner(),
        )?))
    }

    async fn list_workers(
        &self,
        _request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        let inner = self.0.lock();
        let mut queues: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for rec in inner.state.exports.values() {
            for (i, w) in rec.queues.iter().enumerate() {
                queues
                    .entry(w.as_str())
                    .or_default()
                    .push(format!("{}/{i}", rec.export.id));
            }
        }
        let workers = inner
            .state
            .workers
            .iter()
            .map(|(name, rec)| {
                let state = if inner.live_workers.contains_key(name) {
                    WorkerState::Alive
                } else {
                    WorkerState::Gone
                };
                WorkerInfo {
                    name: name.clone(),
                    socket: rec.socket.clone(),
                    pid: rec.pid,
                    state: state as i32,
                    queues: queues.remove(name.as_str()).unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(ListWorkersResponse { workers }))
    }

    async fn move_queue(
        &self,
        request: Request<MoveQueueRequest>,
    ) -> Result<Response<MoveQueueResponse>, Status> {
        let r = request.into_inner();
        let info = WorkerApi::move_queue(self, &r.export, r.queue, &r.worker)?;
        Ok(Response::new(MoveQueueResponse { export: Some(info) }))
    }

    async fn drain_worker(
        &self,
        request: Request<DrainWorkerRequest>,
    ) -> Result<Response<DrainWorkerResponse>, Status> {
        let moved = self.drain(&request.into_inner().worker)?;
        Ok(Response::new(DrainWorkerResponse { moved }))
    }

    async fn move_node(
        &self,
        request: Request<MoveNodeRequest>,
    ) -> Result<Response<MoveNodeResponse>, Status> {
        let r = request.into_inner();
        let moved = WorkerApi::move_node(self, &r.node, &r.worker)?;
        Ok(Response::new(MoveNodeResponse { moved }))
    }
}

// ----- FrontendService -----

/// `blkmesh.v1.FrontendService`.
pub(crate) struct FrontendApi(pub Arc<Shared>);

impl FrontendApi {
    fn register(&self, hello: FrontendHello) -> Result<EventStream<FrontendEvent>, ApiError> {
        validate_name("name", &hello.name)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let session = {
            let mut inner = self.0.lock();
            if inner.shutting_down {
                return Err(ApiError::ShuttingDown);
            }
            if inner
                .frontends
                .get(&hello.name)
                .is_some_and(|c| c.tx.is_some())
            {
                return Err(ApiError::AlreadyRegistered {
                    kind: "frontend",
                    name: hello.name,
                });
            }
            // The snapshot is queued under the lock, so no later change can
            // overtake it or be missed.
            for rec in inner.state.exports.values() {
                if let Some(plan) = export_plan(&inner.state, rec) {
                    let _ = tx.send(Ok(FrontendEvent {
                        event: Some(FrontendEventKind::Upsert(plan)),
                    }));
                }
            }
            let session = inner.next_session;
            inner.next_session += 1;
            inner.frontends.insert(
                hello.name.clone(),
                FrontendConn {
                    session,
                    tx: Some(tx.clone()),
                },
            );
            tracing::info!(frontend = %hello.name, "frontend registered");
            self.0.emit(EventKind::FrontendJoined(hello.name.clone()));
            session
        };
        let shared = self.0.clone();
        let name = hello.name;
        let mut shutdown = self.0.shutdown.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = tx.closed() => {}
                _ = shutdown.wait_for(|v| *v) => {}
            }
            drop(tx);
            shared.frontend_gone(&name, session);
        });
        Ok(Box::pin(UnboundedReceiverStream::new(rx)))
    }
}

impl FrontendApi {
    /// Records a frontend's report on an export. Reports from a frontend
    /// that is not connected, on unknown exports or on another generation
    /// than the export's current one are ignored.
    fn report(&self, st: ExportStatus) -> Result<(), ApiError> {
        validate_name("frontend", &st.frontend)?;
        validate_name("id", &st.id)?;
        let state = match ExportState::try_from(st.state) {
            Ok(
                s @ (ExportState::Pending
                | ExportState::Serving
                | ExportState::Failed
                | ExportState::VmmRefused),
            ) => s,
            Ok(ExportState::Unspecified) | Err(_) => {
                return Err(GraphError::invalid(
                    "state",
                    format!(
                        "must be EXPORT_STATE_PENDING, EXPORT_STATE_SERVING, \
                         EXPORT_STATE_FAILED or EXPORT_STATE_VMM_REFUSED (got {})",
                        st.state
                    ),
                )
                .into())
            }
        };
        let mut message = st.message;
        if message.len() > MAX_REPORT_MESSAGE {
            let mut cut = MAX_REPORT_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let mut inner = self.0.lock();
        let connected = inner
            .frontends
            .get(&st.frontend)
            .is_some_and(|c| c.tx.is_some());
        if !connected {
            tracing::debug!(frontend = %st.frontend, export = %st.id, "report from a frontend that is not connected; ignored");
            return Ok(());
        }
        let current = match inner.state.exports.get(&st.id) {
            Some(rec) => rec.generation,
            None => {
                tracing::debug!(frontend = %st.frontend, export = %st.id, "report on an unknown export; ignored");
                return Ok(());
            }
        };
        if st.generation != current {
            tracing::debug!(
                frontend = %st.frontend,
                export = %st.id,
                generation = st.generation,
                current,
                "report on another generation; ignored"
            );
            return Ok(());
        }
        tracing::debug!(
            frontend = %st.frontend,
            export = %st.id,
            generation = st.generation,
            state = state.as_str_name(),
            size = st.size,
            %message,
            "export report"
        );
        inner.export_rt.entry(st.id.clone()).or_default().report = Some(Report {
            frontend: st.frontend,
            generation: st.generation,
            state,
            message,
            size: st.size,
        });
        self.0.announce(&mut inner, std::slice::from_ref(&st.id));
        drop(inner);
        self.0.reports.send_modify(|n| *n += 1);
        Ok(())
    }
}

impl FrontendApi {
    /// Hands a frontend's answer to the zone call waiting for it. Answers
    /// from another frontend than the one asked, or to a call that is not
    /// waiting (unknown, timed out, cancelled), are ignored.
    fn zone_done(&self, done: ZoneCommandDone) {
        let mut inner = self.0.lock();
        let connected = inner
            .frontends
            .get(&done.frontend)
            .is_some_and(|c| c.tx.is_some());
        let ours = inner
            .zone_calls
            .get(&done.request_id)
            .is_some_and(|call| call.frontend == done.frontend);
        if !(connected && ours) {
            tracing::debug!(
                frontend = %done.frontend,
                request_id = done.request_id,
                "zone answer nobody waits for; ignored"
            );
            return;
        }
        if let Some(call) = inner.zone_calls.remove(&done.request_id) {
            // The caller may have given up meanwhile: nothing to do then.
            let _ = call.done.send(done.result);
        }
    }
}

impl FrontendApi {
    /// Every frontend seen since the manager started, with the exports each
    /// one last reported on (current generation only).
    fn list(&self) -> ListFrontendsResponse {
        let inner = self.0.lock();
        let mut frontends: BTreeMap<&str, FrontendInfo> = inner
            .frontends
            .iter()
            .map(|(name, conn)| {
                let info = FrontendInfo {
                    name: name.clone(),
                    connected: conn.tx.is_some(),
                    ..Default::default()
                };
                (name.as_str(), info)
            })
            .collect();
        // export_rt is a BTreeMap: the lists come out sorted by id.
        for (id, rt) in &inner.export_rt {
            let Some(report) = rt.report.as_ref() else {
                continue;
            };
            let current = inner
                .state
                .exports
                .get(id)
                .is_some_and(|rec| rec.generation == report.generation);
            let Some(info) = frontends.get_mut(report.frontend.as_str()) else {
                continue;
            };
            if !current {
                continue;
            }
            match report.state {
                ExportState::Serving => info.serving.push(id.clone()),
                ExportState::Failed => info.failed.push(id.clone()),
                ExportState::VmmRefused => info.vmm_refused.push(id.clone()),
                ExportState::Pending | ExportState::Unspecified => info.pending.push(id.clone()),
            }
        }
        ListFrontendsResponse {
            frontends: frontends.into_values().collect(),
        }
    }
}

#[tonic::async_trait]
impl FrontendService for FrontendApi {
    async fn list_frontends(
        &self,
        _request: Request<ListFrontendsRequest>,
    ) -> Result<Response<ListFrontendsResponse>, Status> {
        Ok(Response::new(self.list()))
    }

    async fn report_export(
        &self,
        request: Request<ExportStatus>,
    ) -> Result<Response<ReportExportResponse>, Status> {
        self.report(request.into_inner())?;
        Ok(Response::new(ReportExportResponse {}))
    }

    async fn zone_command_done(
        &self,
        request: Request<ZoneCommandDone>,
    ) -> Result<Response<ZoneCommandDoneResponse>, Status> {
        self.zone_done(request.into_inner());
        Ok(Response::new(ZoneCommandDoneResponse {}))
    }

    type RegisterStream = EventStream<FrontendEvent>;

    async fn register(
        &self,
        request: Request<FrontendHello>,
    ) -> Result<Response<Self::RegisterStream>, Status> {
        Ok(Response::new(FrontendApi::register(
            self,
            request.into_inner(),
        )?))
    }
}
