//! Why a request was refused ([`ApiError`]), without the transport: the
//! gRPC adapters map each variant to a status code (`crate::api::status`).

use std::io;
use std::path::PathBuf;

use blkmesh_graph::GraphError;

/// A rejected request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// Validation or graph rule.
    #[error(transparent)]
    Graph(#[from] GraphError),
    /// A required message field is missing.
    #[error("{0}: must be set")]
    Missing(&'static str),
    /// A field with a run-time path (e.g. `queues[3].export`) is invalid.
    #[error("{field}: {problem}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A request names a worker the manager has never seen.
    #[error("{field}: worker {name:?} not found")]
    UnknownWorker {
        /// The field naming the worker.
        field: &'static str,
        /// The name.
        name: String,
    },
    /// An export needs a worker and none is registered.
    #[error("no live worker registered; start blkmesh-worker")]
    NoLiveWorker,
    /// A live worker or frontend already uses this name.
    #[error("name: a live {kind} named {name:?} is already registered")]
    AlreadyRegistered {
        /// `worker` or `frontend`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// The change could not be persisted; nothing was changed.
    #[error("cannot save state to {}: {source}", path.display())]
    Persist {
        /// The state file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The manager is stopping and accepts no new registrations.
    #[error("manager is shutting down")]
    ShuttingDown,
    /// A blocking helper task failed.
    #[error("internal error: {0}")]
    Internal(String),
    /// A frontend reported that it could not apply a plan; the change was undone.
    #[error("export {export:?}: the frontend could not {what}: {reason}; {undone}")]
    NotApplied {
        /// The export the frontend failed on.
        export: String,
        /// What it tried, e.g. `open the graph`.
        what: String,
        /// The frontend's message.
        reason: String,
        /// How the change was undone, e.g. `the export was removed`.
        undone: String,
    },
    /// A concurrent change got in the way; retry.
    #[error("{0}")]
    Conflict(String),
    /// A frontend (or its worker) did not answer in time, or went away.
    #[error("{0}")]
    Unavailable(String),
    /// The frontend or worker refused a zone command with `errno`; the
    /// status code follows the errno (`crate::api::zones::errno_code`).
    #[error("{message}")]
    ZoneRefused {
        /// The positive errno the frontend reported.
        errno: i32,
        /// The whole message: what was asked, the frontend's reason, the errno's name.
        message: String,
    },
    /// An agent broke the session protocol (`blkmesh.agent.v1`): the
    /// session ends with this.
    #[error("agent session: {0}")]
    Protocol(String),
}
