//! Exports: adding one (and waiting for a frontend to open it), removing
//! one, and the exports of the configuration file that wait for a worker.

use std::sync::Arc;

use blkmesh_graph::{validate_export, GraphError, ObjectKind};
use blkmesh_proto::agent::v1::frontend_down::Msg as FrontendMsg;
use blkmesh_proto::v1::event::Kind as EventKind;
use blkmesh_proto::v1::{ExportInfo, ExportState, VhostUserBlkExport};

use crate::control::hub::{export_info, Applied, Control, Inner};
use crate::core::error::ApiError;
use crate::core::exports::{check_new_export, check_waiting_conflict};
use crate::core::queues::place_queues;
use crate::core::state::ExportRecord;
use crate::sessions::ExportRuntime;
use crate::store::writer::WriteTicket;

impl Control {
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
            .sessions
            .export_rt
            .insert(rec.export.id.clone(), ExportRuntime::default());
        self.emit(EventKind::ExportAdded(rec.export.id.clone()));
        if let Some(plan) = inner.plan_of(rec) {
            inner.sessions.broadcast(FrontendMsg::Upsert(plan));
        }
    }

    /// Places the exports of the configuration file that wait for a worker
    /// (with at least one live worker), as AddExport would, marks them as
    /// from the configuration and persists them. One that no longer passes
    /// AddExport's checks (the state changed meanwhile) is dropped with an error
    /// in the log.
    pub(super) async fn place_config_exports(&self, ticket: &WriteTicket<'_>) {
        let (next, added) = {
            let inner = self.lock();
            if inner.config_waiting.is_empty() || inner.sessions.live_workers.is_empty() {
                return;
            }
            let mut next = inner.state.clone();
            let mut added = Vec::new();
            for export in inner.config_waiting.iter().cloned() {
                let placed = check_new_export(&next, &export).and_then(|export| {
                    let queues = place_queues(&next, &inner.sessions.live_workers, &export)?;
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
            (next, added)
        };
        if added.is_empty() {
            // Each one failed its checks, and was dropped.
            self.lock().config_waiting.clear();
            return;
        }
        match self.commit(ticket, next).await {
            Ok(mut inner) => {
                inner.config_waiting.clear();
                for rec in &added {
                    self.export_added(&mut inner, rec, true);
                }
            }
            Err(e) => {
                tracing::error!(
                    "cannot add the exports of the configuration file: {e}; \
                                 trying again at the next worker registration"
                );
                self.lock().config_waiting = added.into_iter().map(|r| r.export).collect();
            }
        }
    }

    /// Adds an export and pushes its plan: (id, generation).
    async fn add_export(&self, export: VhostUserBlkExport) -> Result<(String, u64), ApiError> {
        let export = validate_export(&export)?;
        let ticket = self.begin_change().await;
        let (next, rec) = {
            let inner = self.lock();
            check_waiting_conflict(&inner.config_waiting, &export)?;
            let export = check_new_export(&inner.state, &export)?;
            let queues = place_queues(&inner.state, &inner.sessions.live_workers, &export)?;
            let rec = ExportRecord {
                queues,
                export,
                generation: 1,
            };
            let mut next = inner.state.clone();
            next.exports.insert(rec.export.id.clone(), rec.clone());
            (next, rec)
        };
        let mut inner = self.commit(&ticket, next).await?;
        self.export_added(&mut inner, &rec, false);
        Ok((rec.export.id.clone(), rec.generation))
    }

    /// Adds an export, then waits for a connected frontend to open it: an
    /// export the frontend fails to open is removed again.
    pub(crate) async fn add_export_and_wait(
        self: &Arc<Self>,
        export: VhostUserBlkExport,
    ) -> Result<ExportInfo, ApiError> {
        let rx = self.watch_reports();
        let (id, generation) = self
            .run_change(move |control| async move { control.add_export(export).await })
            .await?;
        let applied = self
            .wait_applied(&[(id.clone(), generation)], rx)
            .await
            .remove(&id)
            .unwrap_or(Applied::Gone);
        match applied {
            Applied::Failed(reason) => {
                match self.remove_export_if(&id, Some(generation)).await {
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
                let inner = self.lock();
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

    pub(crate) async fn remove_export(self: &Arc<Self>, id: &str) -> Result<(), ApiError> {
        self.remove_export_if(id, None).await
    }

    /// Removes export `id` (only at `generation`, if given).
    async fn remove_export_if(
        self: &Arc<Self>,
        id: &str,
        generation: Option<u64>,
    ) -> Result<(), ApiError> {
        let id = id.to_string();
        self.run_change(
            move |control| async move { control.remove_export_now(&id, generation).await },
        )
        .await
    }

    async fn remove_export_now(&self, id: &str, generation: Option<u64>) -> Result<(), ApiError> {
        let ticket = self.begin_change().await;
        let (next, from_config) = {
            let mut inner = self.lock();
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
                    self.emit(EventKind::ExportRemoved(id.to_string()));
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
            (next, from_config)
        };
        let mut inner = self.commit(&ticket, next).await?;
        inner.sessions.export_rt.remove(id);
        if from_config {
            tracing::info!(export = %id, "export removed (it came from the configuration file: a start with that file adds it again)");
        } else {
            tracing::info!(export = %id, "export removed");
        }
        self.emit(EventKind::ExportRemoved(id.to_string()));
        inner
            .sessions
            .broadcast(FrontendMsg::Remove(id.to_string()));
        Ok(())
    }

    /// Every export, with its queues and serving state; then the exports of
    /// the configuration file still waiting for a worker.
    pub(crate) fn list_exports(&self) -> Vec<ExportInfo> {
        let inner = self.lock();
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
        exports
    }
}
