//! The manager's shared state: the persistent state and the sessions
//! behind one lock, committing a change, the event feed, and waiting for
//! the frontends to apply a plan. The operations are in the sibling
//! modules, one per kind of object.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use blkmesh_graph::{GraphError, SECTOR_SIZE};
use blkmesh_proto::agent::v1::frontend_down::Msg as FrontendMsg;
use blkmesh_proto::v1::event::Kind as EventKind;
use blkmesh_proto::v1::{
    Event, ExportInfo, ExportPlan, ExportState, ExportStateEvent, QueueAssignment,
    VhostUserBlkExport,
};
use tokio::sync::{broadcast, watch};

use crate::core::error::ApiError;
use crate::core::jobs::JobRecord;
use crate::core::state::{ExportRecord, State};
use crate::core::views::export_plan;
use crate::sessions::Sessions;
use crate::stats::{self as stats_mod, StatsStore};
use crate::store::writer::{Store, WriteTicket};

/// How an export ended up after a plan push (see [`Control::wait_applied`]).
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

/// Everything behind the manager's lock.
pub(crate) struct Inner {
    /// The persistent state, as last committed.
    pub state: State,
    /// The registered workers and frontends.
    pub sessions: Sessions,
    /// Exports of the configuration file (normalized, checked) that wait
    /// for a worker to register, in file order: placed by the first
    /// registration (see [`Control::place_config_exports`]).
    pub config_waiting: Vec<VhostUserBlkExport>,
    pub shutting_down: bool,
    /// Block jobs, by id (memory only).
    pub jobs: BTreeMap<String, JobRecord>,
    /// Exports switching over to a commit's base node: the commit job
    /// whose last copy the plan asks for (`ExportPlan.commit_finish`).
    pub finishing: BTreeMap<String, String>,
}

impl Inner {
    /// The plan of export `rec` to send to a frontend.
    pub(crate) fn plan_of(&self, rec: &ExportRecord) -> Option<ExportPlan> {
        let mut plan = export_plan(&self.state, rec)?;
        if let Some(job) = self.finishing.get(&rec.export.id) {
            plan.commit_finish.clone_from(job);
        }
        Some(plan)
    }
}

/// The manager: its state behind one lock, the registered agents, the
/// event feed and the stats, shared by all services.
pub(crate) struct Control {
    pub(super) inner: Mutex<Inner>,
    /// Writes the state file, one change at a time, off the lock.
    pub(super) store: Store,
    pub(super) shutdown: watch::Sender<bool>,
    /// Latest stats report per source (memory only; own lock, never held
    /// together with `inner`).
    pub(super) stats: Mutex<StatsStore>,
    /// The event feed (`StatsService.WatchEvents`).
    pub(super) events: broadcast::Sender<Event>,
    /// How long a call waits for the frontends to apply a plan.
    pub(super) apply_timeout: Duration,
    /// Bumped whenever an export report is accepted or a frontend leaves;
    /// callers waiting for a plan to be applied watch it.
    pub(super) reports: watch::Sender<u64>,
    /// How long a worker that went away may take to come back before its
    /// queues are reassigned.
    pub(super) worker_grace: Duration,
    /// Who owns the image files the manager creates (`--image-owner`).
    pub(crate) image_owner: std::sync::OnceLock<(u32, u32)>,
    /// Where AddNode may follow the backing files image headers name
    /// (`--image-dir`).
    pub(crate) image_dirs: std::sync::OnceLock<Vec<PathBuf>>,
}

/// Worker counts for `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct WorkerCounts {
    pub alive: usize,
    pub gone: usize,
}

impl Control {
    pub(crate) fn new(
        state: State,
        state_path: PathBuf,
        apply_timeout: Duration,
        worker_grace: Duration,
    ) -> Arc<Self> {
        let sessions = Sessions::new(state.workers.keys().cloned());
        Arc::new(Control {
            inner: Mutex::new(Inner {
                state,
                sessions,
                config_waiting: Vec::new(),
                shutting_down: false,
                jobs: BTreeMap::new(),
                finishing: BTreeMap::new(),
            }),
            store: Store::new(state_path),
            shutdown: watch::channel(false).0,
            stats: Mutex::new(StatsStore::default()),
            events: stats_mod::event_channel(),
            apply_timeout,
            reports: watch::channel(0).0,
            worker_grace,
            image_owner: std::sync::OnceLock::new(),
            image_dirs: std::sync::OnceLock::new(),
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
            .filter(|w| inner.sessions.live_workers.contains_key(*w))
            .count();
        WorkerCounts {
            alive,
            gone: inner.state.workers.len() - alive,
        }
    }

    /// The manager's lock: the state and the sessions. Never held across
    /// an await, nor while writing the state file.
    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-updated:
        // every change is built on a copy and swapped in whole.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the right to change the persistent state (changes queue
    /// up in order, see [`Store`]). Take it before reading the state a
    /// change starts from, and keep it until the change is committed.
    pub(super) async fn begin_change(&self) -> WriteTicket<'_> {
        self.store.begin().await
    }

    /// Writes `next` to the state file, outside the lock, and once it is
    /// durable makes it the current state; returns the lock, still held,
    /// for the change's announcements. On an error nothing changed.
    pub(super) async fn commit(
        &self,
        ticket: &WriteTicket<'_>,
        next: State,
    ) -> Result<MutexGuard<'_, Inner>, ApiError> {
        let next = self.store.write(ticket, next).await?;
        let mut inner = self.lock();
        inner.state = next;
        Ok(inner)
    }

    /// Runs `change` on a task of its own: once started, a change runs to
    /// its end (written, applied, announced) even when its caller stops
    /// waiting, as a cancelled call does.
    pub(super) async fn run_change<T, F>(
        self: &Arc<Self>,
        change: impl FnOnce(Arc<Control>) -> F,
    ) -> Result<T, ApiError>
    where
        F: Future<Output = Result<T, ApiError>> + Send + 'static,
        T: Send + 'static,
    {
        tokio::spawn(change(Arc::clone(self)))
            .await
            .map_err(|e| ApiError::Internal(format!("change task: {e}")))?
    }

    /// Ends every agent session so the server can shut down (zone calls
    /// waiting for a frontend end with them, UNAVAILABLE).
    pub(crate) fn begin_shutdown(&self) {
        let mut inner = self.lock();
        inner.shutting_down = true;
        for conn in inner.sessions.frontends.values_mut() {
            conn.tx = None;
        }
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

    /// Emits an `export_state` event for each export in `ids` whose state
    /// (as ExportInfo shows it) differs from the one last announced.
    pub(super) fn announce(&self, inner: &mut Inner, ids: &[String]) {
        for id in ids {
            let Some(rec) = inner.state.exports.get(id) else {
                continue;
            };
            let (state, message) = inner.sessions.export_state(rec);
            let rt = inner.sessions.export_rt.entry(id.clone()).or_default();
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
    pub(super) fn watch_reports(&self) -> watch::Receiver<u64> {
        self.reports.subscribe()
    }

    /// Waits (at most the apply timeout) until each `(export, generation)`
    /// in `targets` is reported on at that generation, or one of them
    /// failed. Returns immediately when no frontend is connected. `rx` must
    /// come from [`Control::watch_reports`] taken before the plans were pushed.
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
                let connected = inner.sessions.frontend_connected();
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
                                    .sessions
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

/// What ExportService shows of export `rec`.
pub(super) fn export_info(inner: &Inner, rec: &ExportRecord) -> ExportInfo {
    let state = &inner.state;
    let (export_state, message) = inner.sessions.export_state(rec);
    // Device leaves have no size until opened: then the serving frontend's.
    let size = match state.sizes.get(&rec.export.node).copied().unwrap_or(0) {
        0 => inner
            .sessions
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

/// Sends the current plan of each export in `ids` to the frontends.
pub(super) fn push_plans(inner: &mut Inner, ids: &[&str]) {
    let plans: Vec<ExportPlan> = ids
        .iter()
        .filter_map(|id| inner.state.exports.get(*id))
        .filter_map(|r| inner.plan_of(r))
        .collect();
    for plan in plans {
        inner.sessions.broadcast(FrontendMsg::Upsert(plan));
    }
}

/// Runs a filesystem probe off the async runtime.
pub(super) async fn probe_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, GraphError> + Send + 'static,
) -> Result<T, ApiError> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??)
}
