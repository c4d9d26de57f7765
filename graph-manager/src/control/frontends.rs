//! Frontends: registration, and their reports on the exports they serve.
//! Their sessions are in `crate::control::agents`.

use std::collections::BTreeMap;
use std::sync::Arc;

use blkmesh_graph::{validate_name, GraphError};
use blkmesh_proto::agent::v1::frontend_down::Msg as FrontendMsg;
use blkmesh_proto::agent::v1::{Accepted, ExportStatus, FrontendHello, SnapshotEnd};
use blkmesh_proto::v1::event::Kind as EventKind;
use blkmesh_proto::v1::{ExportState, FrontendInfo, ListFrontendsResponse};
use tokio::sync::mpsc;

use crate::control::hub::Control;
use crate::core::error::ApiError;
use crate::sessions::{FrontendConn, Report, ToFrontend, MAX_REPORT_MESSAGE};

impl Control {
    /// Frontend `name`'s session `session` ended.
    pub(super) fn frontend_gone(&self, name: &str, session: u64) {
        let mut inner = self.lock();
        let Some(conn) = inner.sessions.frontends.get_mut(name) else {
            return;
        };
        if conn.session != session || conn.tx.is_none() {
            return;
        }
        conn.tx = None;
        tracing::info!(frontend = %name, "frontend gone");
        self.emit(EventKind::FrontendLeft(name.to_string()));
        // Its exports are pending until a frontend reports on them again.
        for rt in inner.sessions.export_rt.values_mut() {
            if rt.report.as_ref().is_some_and(|r| r.frontend == name) {
                rt.report = None;
            }
        }
        let ids: Vec<String> = inner.state.exports.keys().cloned().collect();
        self.announce(&mut inner, &ids);
        self.reports.send_modify(|n| *n += 1);
    }

    /// Registers frontend `hello.name` under a fresh session number: what
    /// to send it comes on the returned receiver, starting with `accepted`,
    /// the plan of every export and `snapshot_end`. The caller runs
    /// [`Control::frontend_gone`] when the session ends.
    pub(super) fn register_frontend(
        self: &Arc<Self>,
        hello: &FrontendHello,
    ) -> Result<(u64, mpsc::UnboundedReceiver<ToFrontend>), ApiError> {
        validate_name("name", &hello.name)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let session = {
            let mut inner = self.lock();
            if inner.shutting_down {
                return Err(ApiError::ShuttingDown);
            }
            if inner.sessions.frontend_live(&hello.name) {
                return Err(ApiError::AlreadyRegistered {
                    kind: "frontend",
                    name: hello.name.clone(),
                });
            }
            // The snapshot is queued under the lock, so no later change can
            // overtake it or be missed.
            let send = |msg| {
                let _ = tx.send(ToFrontend::Send(msg));
            };
            send(FrontendMsg::Accepted(Accepted {}));
            for rec in inner.state.exports.values() {
                if let Some(plan) = inner.plan_of(rec) {
                    send(FrontendMsg::Upsert(plan));
                }
            }
            send(FrontendMsg::SnapshotEnd(SnapshotEnd {}));
            let session = inner.sessions.new_session();
            inner.sessions.frontends.insert(
                hello.name.clone(),
                FrontendConn {
                    session,
                    tx: Some(tx.clone()),
                },
            );
            tracing::info!(frontend = %hello.name, "frontend registered");
            self.emit(EventKind::FrontendJoined(hello.name.clone()));
            session
        };
        Ok((session, rx))
    }

    /// Records frontend `frontend`'s report on an export. Reports from a
    /// frontend that is not connected, on unknown exports or on another
    /// generation than the export's current one are ignored.
    pub(super) fn report_export(&self, frontend: &str, st: ExportStatus) -> Result<(), ApiError> {
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
        let mut inner = self.lock();
        let connected = inner.sessions.frontend_live(frontend);
        if !connected {
            tracing::debug!(%frontend, export = %st.id, "report from a frontend that is not connected; ignored");
            return Ok(());
        }
        let current = match inner.state.exports.get(&st.id) {
            Some(rec) => rec.generation,
            None => {
                tracing::debug!(%frontend, export = %st.id, "report on an unknown export; ignored");
                return Ok(());
            }
        };
        if st.generation != current {
            tracing::debug!(
                %frontend,
                export = %st.id,
                generation = st.generation,
                current,
                "report on another generation; ignored"
            );
            return Ok(());
        }
        tracing::debug!(
            %frontend,
            export = %st.id,
            generation = st.generation,
            state = state.as_str_name(),
            size = st.size,
            %message,
            "export report"
        );
        inner
            .sessions
            .export_rt
            .entry(st.id.clone())
            .or_default()
            .report = Some(Report {
            frontend: frontend.to_string(),
            generation: st.generation,
            state,
            message,
            size: st.size,
        });
        self.announce(&mut inner, std::slice::from_ref(&st.id));
        drop(inner);
        self.reports.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Every frontend seen since the manager started, with the exports each
    /// one last reported on (current generation only).
    pub(crate) fn list_frontends(&self) -> ListFrontendsResponse {
        let inner = self.lock();
        let mut frontends: BTreeMap<&str, FrontendInfo> = inner
            .sessions
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
        for (id, rt) in &inner.sessions.export_rt {
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
