//! Errors of `blkmesh up`.

use std::path::PathBuf;
use std::time::Duration;

/// Why `blkmesh up` could not start (or keep) the process set.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot locate the blkmesh binaries")]
    CurrentExe(#[source] std::io::Error),
    #[error("{name} not found at {}; build every binary (cargo build --bins) or set BLKMESH_BIN_DIR", path.display())]
    MissingBinary { name: &'static str, path: PathBuf },
    #[error("cannot resolve path {}", path.display())]
    Path {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create directory {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create image {}", path.display())]
    CreateImage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {} is not a regular file or block device", path.display())]
    ImageNotAFile { path: PathBuf },
    #[error("socket path {} is {len} bytes long; unix sockets allow at most {max}", path.display())]
    SocketPathTooLong {
        path: PathBuf,
        len: usize,
        max: usize,
    },
    #[error("cannot lock {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--worker-user")]
    WorkerUser(#[source] blkmesh_sandbox::SandboxError),
    #[error("cannot give {} to the worker user {user}", path.display())]
    GiveToWorker {
        path: PathBuf,
        user: String,
        #[source]
        source: std::io::Error,
    },
    #[error("image {} is not {need} by the worker user {user}: chown it, or pass --worker-user root", path.display())]
    NotForWorker {
        path: PathBuf,
        user: String,
        need: &'static str,
    },
    #[error("the worker user {user} cannot reach {}: directory {} is closed to it; use a --dir (or image) it can reach, e.g. under /var/lib, or --worker-user root", path.display(), dir.display())]
    WorkerCannotReach {
        path: PathBuf,
        dir: PathBuf,
        user: String,
    },
    #[error("another `blkmesh up` is already running in {}", dir.display())]
    AlreadyRunning { dir: PathBuf },
    #[error("cannot open log {}", path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {name}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} exited during startup ({status}); its log {} ends with:\n{tail}", log.display())]
    StartupExit {
        name: String,
        status: std::process::ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },
    #[error("cannot set up the connection to the manager at {addr}")]
    Endpoint {
        addr: String,
        #[source]
        source: blkmesh_proto::client::ClientError,
    },
    #[error("{what} failed ({code:?}): {message}")]
    Rpc {
        what: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("configuration {file} refused (nothing was started):\n{errors}")]
    Config {
        file: String,
        errors: blkmesh_graph::config::ConfigErrors,
    },
    #[error("cannot install a handler for {signal}")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The exit status of `blkmesh`: 2 for a configuration file refused
    /// (by the check here, or by the manager, which exits with 2 then), 1
    /// otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config { .. } => 2,
            Error::StartupExit { name, status, .. }
                if name == "manager" && status.code() == Some(2) =>
            {
                2
            }
            _ => 1,
        }
    }

    pub fn rpc(what: &'static str) -> impl FnOnce(tonic::Status) -> Error {
        move |status| Error::Rpc {
            what,
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}
