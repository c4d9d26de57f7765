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
    #[error("invalid manager address {addr}")]
    Endpoint {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{what} failed ({code:?}): {message}")]
    Rpc {
        what: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("cannot install a handler for {signal}")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn rpc(what: &'static str) -> impl FnOnce(tonic::Status) -> Error {
        move |status| Error::Rpc {
            what,
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}
