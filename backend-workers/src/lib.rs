//! `blkmesh-worker`: a backend worker process.
//!
//! A worker accepts connections from the frontend on a unix socket
//! (SOCK_SEQPACKET, see [`blkmesh_ipc::channel`]). Each connection serves one
//! export: the frontend sends the export's plan (its node graph), the guest
//! memory table as memfds, and one ring memfd plus two eventfds per virtqueue.
//! The worker opens the graph with libblkio (the `blkio` crate), maps guest RAM
//! and registers it with libblkio, and runs one event loop thread per queue
//! that turns ring entries into vectored libblkio requests over guest memory,
//! with no copy (a bounce buffer only where the driver's alignment demands it),
//! split into sub-requests where they break the graph's limits.
//!
//! The worker trusts nothing it receives: the plan is validated again, and
//! every ring entry's tag, op, segments and range are checked; a bad entry
//! fails that request only.

pub mod bounce;
pub mod checks;
pub mod claim;
pub mod connection;
pub mod errno;
pub mod graph;
pub mod handover;
pub mod jobs;
pub mod leaf;
pub mod memory;
pub mod pipeline;
pub mod probe;
pub mod qcow2;
pub mod queue;
pub mod registration;
pub mod slot;
pub mod split;
pub mod stages;
pub mod test_hooks;
pub mod zoned;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use blkmesh_ipc::channel::ChannelListener;

/// This process's I/O statistics, reported to the manager.
pub fn stats() -> &'static blkmesh_stats::Registry {
    static REGISTRY: std::sync::OnceLock<blkmesh_stats::Registry> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(blkmesh_stats::Registry::default)
}

/// How a worker is run.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Unique worker name.
    pub name: String,
    /// Where to listen for the frontend.
    pub socket: PathBuf,
    /// The manager's gRPC address (e.g. `http://127.0.0.1:50051`); `None` runs
    /// without registering (tests of the data path alone).
    pub manager: Option<String>,
    /// Socket permissions and seccomp filter (docs/SECURITY.md).
    pub sandbox: blkmesh_sandbox::SandboxArgs,
    /// The unprivileged user to run as once the socket is bound.
    pub user: blkmesh_sandbox::UserArgs,
}

/// Errors that stop a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("listening on the worker socket")]
    Listen(#[source] blkmesh_sandbox::SandboxError),
    #[error("least privilege")]
    Sandbox(#[source] blkmesh_sandbox::SandboxError),
    #[error("registration with the manager")]
    Registration(#[source] registration::RegistrationError),
}

/// Runs a worker until `stop` is set (it is checked between connections) or
/// registration fails for good.
pub fn run(config: WorkerConfig, stop: Arc<AtomicBool>) -> Result<(), WorkerError> {
    // Least privilege (docs/SECURITY.md), in this order: who may connect
    // (the socket has its final mode before its path exists), then the
    // unprivileged user, then the seccomp filter on every thread.
    let policy = config
        .sandbox
        .socket_policy()
        .map_err(WorkerError::Sandbox)?;
    let listener = policy
        .listen_unix(
            &config.socket,
            blkmesh_sandbox::UnixSocketKind::SeqPacket,
            64,
        )
        .map(ChannelListener::from_listening)
        .map_err(WorkerError::Listen)?;
    config
        .user
        .drop_privileges()
        .map_err(WorkerError::Sandbox)?;
    config
        .sandbox
        .install_seccomp(blkmesh_sandbox::Kind::Worker)
        .map_err(WorkerError::Sandbox)?;
    tracing::info!(name = %config.name, socket = %config.socket.display(), "worker listening");
    if let Some(addr) = config.manager.clone() {
        registration::spawn(addr, config.name.clone(), config.socket.clone())
            .map_err(WorkerError::Registration)?;
    }
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok(channel) => {
                let name = config.name.clone();
                let spawned = std::thread::Builder::new()
                    .name("conn".into())
                    .spawn(move || connection::serve(channel, &name));
                if let Err(e) = spawned {
                    tracing::error!("cannot start a connection thread: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}
