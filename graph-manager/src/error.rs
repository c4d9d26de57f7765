//! Errors: process-level ([`ManagerError`]) and per-request ([`ApiError`],
//! mapped to a `tonic::Status` without wildcards).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use blkmesh_graph::{ErrorClass, GraphError};

/// Why the manager could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// Narrowing the process's privileges failed (docs/SECURITY.md).
    #[error("least privilege")]
    Sandbox(#[source] blkmesh_sandbox::SandboxError),
    /// The state directory could not be created.
    #[error("cannot create state directory {}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The state file exists but could not be read.
    #[error("cannot read state file {}", path.display())]
    ReadState {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The state file is not a valid blkmesh-manager state; it is left untouched.
    #[error(
        "corrupt state file {}: {reason} (refusing to start; the file was not modified)",
        path.display()
    )]
    CorruptState {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The configuration file is invalid, or cannot be applied to the
    /// state; nothing was changed.
    #[error(
        "configuration {file} refused (the manager did not start; its state was not changed):\n{errors}"
    )]
    Config {
        /// The file, as given.
        file: String,
        /// Every problem, each with its line and field.
        errors: crate::config::ConfigErrors,
    },
    /// The state file could not be written.
    #[error("cannot save state file {}", path.display())]
    SaveState {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The TCP listener could not be bound.
    #[error("cannot listen on {addr}")]
    BindTcp {
        /// The requested address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The metrics listener could not be bound.
    #[error("cannot serve metrics on {addr}")]
    BindMetrics {
        /// The requested address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The unix listener could not be set up.
    #[error("cannot listen on unix socket {}", path.display())]
    BindUnix {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The unix socket path is taken by something that is not a socket.
    #[error("cannot listen on unix socket {}: path exists and is not a socket", path.display())]
    UnixPathTaken {
        /// The socket path.
        path: PathBuf,
    },
    /// A TLS certificate or key file could not be read.
    #[error("cannot read TLS {what} {}", path.display())]
    ReadTls {
        /// `certificate`, `key` or `client CA certificate`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The TLS certificate, key or client CA is not usable.
    #[error("invalid TLS certificate, key or client CA")]
    Tls(#[source] tonic::transport::Error),
    /// The bearer token is not usable.
    #[error(transparent)]
    Token(#[from] blkmesh_proto::client::TokenError),
    /// The gRPC server failed.
    #[error("gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
    /// The server task panicked or was cancelled.
    #[error("manager task failed")]
    Join(#[source] tokio::task::JoinError),
}

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
    /// status code follows the errno (`crate::zones::errno_code`).
    #[error("{message}")]
    ZoneRefused {
        /// The positive errno the frontend reported.
        errno: i32,
        /// The whole message: what was asked, the frontend's reason, the errno's name.
        message: String,
    },
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let msg = e.to_string();
        match e {
            ApiError::Graph(g) => match g.class() {
                ErrorClass::InvalidArgument => tonic::Status::invalid_argument(msg),
                ErrorClass::NotFound => tonic::Status::not_found(msg),
                ErrorClass::AlreadyExists => tonic::Status::already_exists(msg),
                ErrorClass::FailedPrecondition => tonic::Status::failed_precondition(msg),
            },
            ApiError::Missing(_) => tonic::Status::invalid_argument(msg),
            ApiError::Invalid { .. } => tonic::Status::invalid_argument(msg),
            ApiError::UnknownWorker { .. } => tonic::Status::not_found(msg),
            ApiError::NoLiveWorker => tonic::Status::failed_precondition(msg),
            ApiError::AlreadyRegistered { .. } => tonic::Status::already_exists(msg),
            ApiError::Persist { .. } => tonic::Status::internal(msg),
            ApiError::ShuttingDown => tonic::Status::unavailable(msg),
            ApiError::Internal(_) => tonic::Status::internal(msg),
            ApiError::NotApplied { .. } => tonic::Status::failed_precondition(msg),
            ApiError::Conflict(_) => tonic::Status::aborted(msg),
            ApiError::Unavailable(_) => tonic::Status::unavailable(msg),
            ApiError::ZoneRefused { errno, .. } => {
                tonic::Status::new(crate::zones::errno_code(errno), msg)
            }
        }
    }
}
