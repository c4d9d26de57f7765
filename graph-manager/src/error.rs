//! Why the manager could not start or stopped ([`ManagerError`]); the errors
//! of single requests are `crate::core::error::ApiError`.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

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
        errors: blkmesh_graph::config::ConfigErrors,
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
