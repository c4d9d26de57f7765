//! The live agents: the workers and frontends holding an agent session
//! (`blkmesh.agent.v1`) with the manager, and what the frontends report
//! on each export. Memory only: a restarted manager waits for the agents
//! to open their sessions again.

use std::collections::{BTreeMap, BTreeSet};

use blkmesh_proto::agent::v1::frontend_down::Msg as FrontendMsg;
use blkmesh_proto::agent::v1::{JobCommand, ZoneCommand};
use blkmesh_proto::v1::ExportState;
use tokio::sync::{mpsc, oneshot};

use crate::core::state::ExportRecord;

/// What a frontend answered to a zone command (`None`: no result set).
pub(crate) type ZoneAnswer = Option<blkmesh_proto::agent::v1::zone_answer::Result>;

/// What a frontend answered to a job command (`None`: no result set).
pub(crate) type JobAnswer = Option<blkmesh_proto::agent::v1::job_answer::Result>;

/// What the manager hands a frontend's session to send down.
#[derive(Debug)]
pub(crate) enum ToFrontend {
    /// Send this as it is.
    Send(FrontendMsg),
    /// Send this zone command under a fresh id of the session, and pass
    /// the answer with that id to `answer`. Dropping `answer` unanswered
    /// (the session ended) tells the caller the frontend went away.
    Zone {
        command: ZoneCommand,
        answer: oneshot::Sender<ZoneAnswer>,
    },
    /// A job command, the same way.
    Job {
        command: JobCommand,
        answer: oneshot::Sender<JobAnswer>,
    },
}

/// A registered frontend.
pub(crate) struct FrontendConn {
    pub session: u64,
    /// `None` once the frontend's session is gone.
    pub tx: Option<mpsc::UnboundedSender<ToFrontend>>,
}

/// Longest `ExportStatus.message` kept; longer ones are cut.
pub(crate) const MAX_REPORT_MESSAGE: usize = 1024;

/// A frontend's latest report on an export (memory only).
#[derive(Debug, Clone)]
pub(crate) struct Report {
    pub frontend: String,
    pub generation: u64,
    pub state: ExportState,
    pub message: String,
    /// Size in bytes the frontend serves (0 unless serving).
    pub size: u64,
}

/// Whether a report in `state` means the frontend has the graph open and
/// listens (a refused VMM does not change that).
pub(crate) fn serves(state: ExportState) -> bool {
    matches!(state, ExportState::Serving | ExportState::VmmRefused)
}

/// What the manager knows at run time about an export's serving state.
#[derive(Debug, Clone)]
pub(crate) struct ExportRuntime {
    /// The latest accepted report (of the export's current generation when
    /// it was accepted); dropped when its frontend goes away.
    pub report: Option<Report>,
    /// The state last announced with an `export_state` event.
    pub announced: ExportState,
}

impl Default for ExportRuntime {
    fn default() -> Self {
        ExportRuntime {
            report: None,
            announced: ExportState::Pending,
        }
    }
}

/// The registered workers and frontends, by name.
pub(crate) struct Sessions {
    /// Live workers: name → registration session.
    pub live_workers: BTreeMap<String, u64>,
    /// Known workers that are not registered, within their grace: name →
    /// the registration session that ended (0: not seen since the manager
    /// started). A grace timer runs for each.
    pub gone_since: BTreeMap<String, u64>,
    /// Workers whose grace ran out while no live worker could take their
    /// queues: reassigned when one registers.
    pub overdue: BTreeSet<String>,
    /// Frontends by name, alive (with a sender) or gone.
    pub frontends: BTreeMap<String, FrontendConn>,
    /// Serving state per export id.
    pub export_rt: BTreeMap<String, ExportRuntime>,
    pub next_session: u64,
}

impl Sessions {
    /// No agent registered yet; the workers of the state file `known` are
    /// gone, within their grace (session 0: not seen since the start).
    pub(crate) fn new(known: impl IntoIterator<Item = String>) -> Sessions {
        Sessions {
            live_workers: BTreeMap::new(),
            gone_since: known.into_iter().map(|w| (w, 0)).collect(),
            overdue: BTreeSet::new(),
            frontends: BTreeMap::new(),
            export_rt: BTreeMap::new(),
            // Session 0 means "not seen since the start" (`gone_since`).
            next_session: 1,
        }
    }

    /// Whether any frontend is connected.
    pub(crate) fn frontend_connected(&self) -> bool {
        self.frontends.values().any(|c| c.tx.is_some())
    }

    /// The current report on `rec` if it says SERVING and its frontend is connected.
    pub(crate) fn serving_report(&self, rec: &ExportRecord) -> Option<&Report> {
        self.export_rt
            .get(&rec.export.id)
            .and_then(|rt| rt.report.as_ref())
            .filter(|r| r.generation == rec.generation && serves(r.state))
            .filter(|r| self.frontend_live(&r.frontend))
    }

    /// ExportInfo.state and .message of an export.
    pub(crate) fn export_state(&self, rec: &ExportRecord) -> (ExportState, String) {
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

    /// A fresh registration session number.
    pub(crate) fn new_session(&mut self) -> u64 {
        let session = self.next_session;
        self.next_session += 1;
        session
    }

    /// Whether frontend `name` is registered and its stream open.
    pub(crate) fn frontend_live(&self, name: &str) -> bool {
        self.frontends.get(name).is_some_and(|c| c.tx.is_some())
    }

    /// Sends `msg` to every connected frontend.
    pub(crate) fn broadcast(&mut self, msg: FrontendMsg) {
        for (name, conn) in self.frontends.iter_mut() {
            if let Some(tx) = &conn.tx {
                if tx.send(ToFrontend::Send(msg.clone())).is_err() {
                    tracing::debug!(frontend = %name, "frontend stream closed while sending");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
