//! ZoneService calls: a zone command forwarded to the frontend serving
//! the export (on its session, which numbers it and matches the answer,
//! see `crate::control::agents`), and the wait for its answer.

use blkmesh_graph::{GraphError, ObjectKind, SECTOR_SIZE};
use blkmesh_proto::agent::v1::ZoneCommand;
use blkmesh_proto::v1::ZoneInfo;
use tokio::sync::oneshot;

use crate::control::hub::Control;
use crate::core::error::ApiError;
use crate::core::zoned;
use crate::sessions::{serves, ToFrontend, ZoneAnswer};

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
/// (the call was cancelled, or timed out) lets the session forget the call.
pub(crate) struct PendingZoneCall<'a> {
    control: &'a Control,
    rx: oneshot::Receiver<ZoneAnswer>,
    pub target: ZoneTarget,
}

impl PendingZoneCall<'_> {
    /// Waits (at most the apply timeout) for the frontend's answer.
    pub(crate) async fn answer(self) -> Result<ZoneAnswer, ApiError> {
        let timeout = self.control.apply_timeout;
        match tokio::time::timeout(timeout, self.rx).await {
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

impl Control {
    /// Starts a ZoneService call on export `export`: looks it up (NOT_FOUND),
    /// requires a zoned graph (FAILED_PRECONDITION), lets `check` validate the
    /// call against the export and build the command, requires a connected
    /// frontend serving the export (FAILED_PRECONDITION) and hands its
    /// session the command. Await the answer with
    /// [`PendingZoneCall::answer`].
    pub(crate) fn send_zone_command(
        &self,
        export: &str,
        check: impl FnOnce(&ZoneTarget) -> Result<ZoneCommand, ApiError>,
    ) -> Result<PendingZoneCall<'_>, ApiError> {
        let inner = self.lock();
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
            .sessions
            .export_rt
            .get(export)
            .and_then(|rt| rt.report.as_ref())
            .filter(|r| serves(r.state))
            .filter(|r| inner.sessions.frontend_live(&r.frontend));
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
        command.export = export.to_string();
        let (answer, rx) = oneshot::channel();
        let sent = inner
            .sessions
            .frontends
            .get(&frontend)
            .and_then(|c| c.tx.as_ref())
            .is_some_and(|tx| tx.send(ToFrontend::Zone { command, answer }).is_ok());
        if !sent {
            return Err(ApiError::Unavailable(format!(
                "export {export:?}: frontend {frontend:?} went away"
            )));
        }
        target.frontend = frontend;
        Ok(PendingZoneCall {
            control: self,
            rx,
            target,
        })
    }
}
