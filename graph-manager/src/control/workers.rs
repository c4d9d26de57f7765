//! Workers: registration, the grace of a worker that went away and the
//! move of its queues, and the queue moves WorkerService asks for.

use std::collections::BTreeMap;
use std::sync::Arc;

use blkmesh_graph::kinds::qcow2::writable_qcow2_in_graph;
use blkmesh_graph::{validate_name, validate_socket_path, GraphError, ObjectKind};
use blkmesh_proto::agent::v1::frontend_down::Msg as FrontendMsg;
use blkmesh_proto::agent::v1::WorkerHello;
use blkmesh_proto::v1::event::Kind as EventKind;
use blkmesh_proto::v1::{ExportInfo, ExportPlan, MovedQueue, WorkerInfo, WorkerState};

use crate::control::hub::{export_info, push_plans, Control, Inner};
use crate::core::error::ApiError;
use crate::core::queues::{apply_moves, plan_drain, plan_move_node, plan_reassign};
use crate::core::state::WorkerRecord;
use crate::core::zoned;
use crate::sessions::Sessions;
use crate::store::writer::WriteTicket;

impl Control {
    /// Worker `name`'s session `session` ended.
    pub(super) fn worker_gone(self: &Arc<Self>, name: &str, session: u64) {
        let mut inner = self.lock();
        if inner.sessions.live_workers.get(name) == Some(&session) {
            inner.sessions.live_workers.remove(name);
            let queues = inner.state.queue_counts().get(name).copied().unwrap_or(0);
            tracing::info!(
                worker = %name,
                queues,
                grace_ms = self.worker_grace.as_millis() as u64,
                "worker gone"
            );
            self.emit(EventKind::WorkerLeft(name.to_string()));
            if !inner.shutting_down {
                inner.sessions.gone_since.insert(name.to_string(), session);
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
                .sessions
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
        let control = Arc::clone(self);
        let grace = self.worker_grace;
        let mut shutdown = self.shutdown.subscribe();
        tokio::spawn(async move {
            let expired = tokio::select! {
                () = tokio::time::sleep(grace) => true,
                _ = shutdown.wait_for(|v| *v) => false,
            };
            if expired {
                control.grace_expired(&name, session).await;
            }
        });
    }

    async fn grace_expired(self: &Arc<Self>, name: &str, session: u64) {
        let ticket = self.begin_change().await;
        {
            let mut inner = self.lock();
            if inner.shutting_down
                || inner.sessions.live_workers.contains_key(name)
                || inner.sessions.gone_since.get(name) != Some(&session)
            {
                return;
            }
            inner.sessions.gone_since.remove(name);
            tracing::info!(worker = %name, grace_ms = self.worker_grace.as_millis() as u64, "worker did not come back within its grace");
            inner.sessions.overdue.insert(name.to_string());
        }
        self.reassign_overdue(&ticket).await;
    }

    /// Moves every queue of the overdue workers to the live ones, persists
    /// and pushes the new plans. Without a live worker it waits (the next
    /// registration calls it again).
    async fn reassign_overdue(self: &Arc<Self>, ticket: &WriteTicket<'_>) {
        let (moved, next) = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let Sessions {
                overdue,
                live_workers,
                ..
            } = &mut inner.sessions;
            overdue.retain(|w| !live_workers.contains_key(w));
            if inner.sessions.overdue.is_empty() || inner.shutting_down {
                return;
            }
            let counts = inner.state.queue_counts();
            let stranded: usize = inner
                .sessions
                .overdue
                .iter()
                .map(|w| counts.get(w.as_str()).copied().unwrap_or(0))
                .sum();
            if stranded == 0 {
                inner.sessions.overdue.clear();
                return;
            }
            if inner.sessions.live_workers.is_empty() {
                tracing::warn!(
                    workers = ?inner.sessions.overdue,
                    queues = stranded,
                    "no live worker to take the queues of the lost workers; \
                     waiting for a worker to register"
                );
                return;
            }
            let moved = plan_reassign(
                &inner.state,
                &inner.sessions.live_workers,
                &inner.sessions.overdue,
            );
            let mut next = inner.state.clone();
            apply_moves(&mut next, &moved);
            (moved, next)
        };
        let mut inner = match self.commit(ticket, next).await {
            Ok(inner) => inner,
            Err(e) => {
                let mut inner = self.lock();
                // Tried again after another grace (a fresh timer under a session
                // no registration uses), or at the next registration.
                tracing::error!(workers = ?inner.sessions.overdue, "cannot reassign the queues of lost workers: {e}");
                let retry: Vec<String> = inner.sessions.overdue.iter().cloned().collect();
                for name in retry {
                    inner.sessions.gone_since.insert(name.clone(), u64::MAX);
                    self.spawn_grace_timer(name, u64::MAX);
                }
                return;
            }
        };
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
            workers = ?inner.sessions.overdue,
            queues = moved.len(),
            exports = ids.len(),
            "lost workers' queues reassigned"
        );
        push_plans(&mut inner, &ids);
        inner.sessions.overdue.clear();
    }

    /// Every worker seen, alive or gone, with its queues.
    pub(crate) fn list_workers(&self) -> Vec<WorkerInfo> {
        let inner = self.lock();
        let mut queues: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for rec in inner.state.exports.values() {
            for (i, w) in rec.queues.iter().enumerate() {
                queues
                    .entry(w.as_str())
                    .or_default()
                    .push(format!("{}/{i}", rec.export.id));
            }
        }
        inner
            .state
            .workers
            .iter()
            .map(|(name, rec)| {
                let state = if inner.sessions.live_workers.contains_key(name) {
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
            .collect()
    }

    /// Registers worker `hello.name` under a fresh session number. The
    /// caller runs [`Control::worker_gone`] when the session ends.
    pub(super) async fn register_worker(
        self: &Arc<Self>,
        hello: WorkerHello,
    ) -> Result<u64, ApiError> {
        validate_name("name", &hello.name)?;
        validate_socket_path("socket", &hello.socket)?;
        self.run_change(move |control| async move { control.register_worker_now(hello).await })
            .await
    }

    async fn register_worker_now(self: &Arc<Self>, hello: WorkerHello) -> Result<u64, ApiError> {
        let ticket = self.begin_change().await;
        let record = WorkerRecord {
            socket: hello.socket.clone(),
            pid: hello.pid,
        };
        let (previous, next) = {
            let inner = self.lock();
            if inner.shutting_down {
                return Err(ApiError::ShuttingDown);
            }
            if inner.sessions.live_workers.contains_key(&hello.name) {
                return Err(ApiError::AlreadyRegistered {
                    kind: "worker",
                    name: hello.name,
                });
            }
            let previous = inner.state.workers.get(&hello.name).cloned();
            let next = (previous.as_ref() != Some(&record)).then(|| {
                let mut next = inner.state.clone();
                next.workers.insert(hello.name.clone(), record);
                next
            });
            (previous, next)
        };
        let session = {
            let mut inner = match next {
                Some(next) => self.commit(&ticket, next).await?,
                None => self.lock(),
            };
            let session = inner.sessions.new_session();
            inner
                .sessions
                .live_workers
                .insert(hello.name.clone(), session);
            inner.sessions.gone_since.remove(&hello.name);
            inner.sessions.overdue.remove(&hello.name);
            tracing::info!(worker = %hello.name, socket = %hello.socket, pid = hello.pid, "worker registered");
            self.emit(EventKind::WorkerJoined(hello.name.clone()));
            if previous.is_some_and(|p| p.socket != hello.socket) {
                let plans: Vec<ExportPlan> = inner
                    .state
                    .exports
                    .values()
                    .filter(|r| r.queues.contains(&hello.name))
                    .filter_map(|r| inner.plan_of(r))
                    .collect();
                for plan in plans {
                    inner.sessions.broadcast(FrontendMsg::Upsert(plan));
                }
            }
            session
        };
        // Workers whose grace ran out with nobody to take their queues.
        self.reassign_overdue(&ticket).await;
        // Exports of the configuration file waiting for a worker.
        self.place_config_exports(&ticket).await;
        Ok(session)
    }

    /// Moves queue `queue` of export `id` to `worker` (a live worker).
    pub(crate) async fn move_queue(
        self: &Arc<Self>,
        id: &str,
        queue: u32,
        worker: &str,
    ) -> Result<ExportInfo, ApiError> {
        let (id, worker) = (id.to_string(), worker.to_string());
        self.run_change(
            move |control| async move { control.move_queue_now(&id, queue, &worker).await },
        )
        .await
    }

    async fn move_queue_now(
        &self,
        id: &str,
        queue: u32,
        worker: &str,
    ) -> Result<ExportInfo, ApiError> {
        let ticket = self.begin_change().await;
        let (next, from) = {
            let inner = self.lock();
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
            check_target(&inner, worker)?;
            let from = rec.queues[queue as usize].clone();
            if from == worker {
                return Ok(export_info(&inner, rec));
            }
            let one_worker = zoned::zoned_in_graph(&inner.state.graph, &rec.export.node)
                .map(|n| format!("zoned node {n:?}"))
                .or_else(|| {
                    writable_qcow2_in_graph(&inner.state.graph, &rec.export.node)
                        .map(|n| format!("writable qcow2 node {n:?}"))
                });
            if let Some(zoned) = one_worker {
                let split = rec
                    .queues
                    .iter()
                    .enumerate()
                    .find(|(i, w)| *i != queue as usize && w.as_str() != worker);
                if let Some((i, other)) = split {
                    return Err(GraphError::precondition(
                        "queue",
                        format!(
                            "export {id:?} is over {zoned}: its queues stay on one \
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
            (next, from)
        };
        let mut inner = self.commit(&ticket, next).await?;
        tracing::info!(export = %id, queue, %from, to = %worker, "queue moved");
        push_plans(&mut inner, &[id]);
        let rec = &inner.state.exports[id];
        Ok(export_info(&inner, rec))
    }

    /// Moves every queue of every export whose graph contains `node` to
    /// `worker` (a live worker). Queues already there are not listed.
    pub(crate) async fn move_node(
        self: &Arc<Self>,
        node: &str,
        worker: &str,
    ) -> Result<Vec<MovedQueue>, ApiError> {
        let (node, worker) = (node.to_string(), worker.to_string());
        self.run_change(move |control| async move { control.move_node_now(&node, &worker).await })
            .await
    }

    async fn move_node_now(&self, node: &str, worker: &str) -> Result<Vec<MovedQueue>, ApiError> {
        let ticket = self.begin_change().await;
        let moved = {
            let inner = self.lock();
            if !inner.state.graph.contains(node) {
                return Err(GraphError::NotFound {
                    field: "node",
                    kind: ObjectKind::Node,
                    name: node.to_string(),
                }
                .into());
            }
            check_target(&inner, worker)?;
            let moved = plan_move_node(&inner.state, node, worker);
            if moved.is_empty() {
                return Ok(moved);
            }
            moved
        };
        let exports = self.commit_moves(&ticket, &moved).await?;
        tracing::info!(%node, to = %worker, queues = moved.len(), exports, "node moved");
        Ok(moved)
    }

    /// Applies `moved` (planned holding `ticket`) to the state, commits it
    /// and pushes the plans of the exports it touches: returns how many.
    async fn commit_moves(
        &self,
        ticket: &WriteTicket<'_>,
        moved: &[MovedQueue],
    ) -> Result<usize, ApiError> {
        let mut next = self.lock().state.clone();
        apply_moves(&mut next, moved);
        let mut inner = self.commit(ticket, next).await?;
        let mut ids: Vec<&str> = moved.iter().map(|m| m.export.as_str()).collect();
        ids.dedup();
        push_plans(&mut inner, &ids);
        Ok(ids.len())
    }

    /// Moves every queue off `worker` to the least loaded other live workers.
    pub(crate) async fn drain_worker(
        self: &Arc<Self>,
        worker: &str,
    ) -> Result<Vec<MovedQueue>, ApiError> {
        let worker = worker.to_string();
        self.run_change(move |control| async move { control.drain_worker_now(&worker).await })
            .await
    }

    async fn drain_worker_now(&self, worker: &str) -> Result<Vec<MovedQueue>, ApiError> {
        let ticket = self.begin_change().await;
        let moved = {
            let inner = self.lock();
            if !inner.state.workers.contains_key(worker) {
                return Err(ApiError::UnknownWorker {
                    field: "worker",
                    name: worker.to_string(),
                });
            }
            let moved = plan_drain(&inner.state, &inner.sessions.live_workers, worker)?;
            if moved.is_empty() {
                return Ok(moved);
            }
            moved
        };
        let exports = self.commit_moves(&ticket, &moved).await?;
        tracing::info!(%worker, queues = moved.len(), exports, "worker drained");
        Ok(moved)
    }
}

/// Checks that `worker` is known and alive, as a move destination.
fn check_target(inner: &Inner, worker: &str) -> Result<(), ApiError> {
    if !inner.state.workers.contains_key(worker) {
        return Err(ApiError::UnknownWorker {
            field: "worker",
            name: worker.to_string(),
        });
    }
    if !inner.sessions.live_workers.contains_key(worker) {
        return Err(GraphError::precondition(
            "worker",
            format!("worker {worker:?} is not alive; queues can only move to a live worker"),
        )
        .into());
    }
    Ok(())
}
