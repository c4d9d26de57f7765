//! `blkmesh-manager`: the gRPC control plane of blkmesh.
//!
//! The single source of truth for nodes, exports, workers and the
//! queue → worker assignment. It serves `blkmesh.v1` (NodeService,
//! ExportService, WorkerService, FrontendService, StatsService) plus the standard
//! `grpc.health.v1.Health` service, persists its state to
//! `<state-dir>/state.json` after every change and reloads it on start.
//! Workers and frontends register over server-streaming calls and keep
//! them open; a closed stream marks them gone.
//!
//! Frontends and workers push cumulative counters (`StatsService.ReportStats`);
//! the manager keeps the latest report per source in memory and serves them
//! summed per export, queue and node (`GetStats`, see `stats.rs` for the
//! rules), and optionally as Prometheus text on `GET /metrics`
//! ([`ManagerConfig::with_metrics`]). `WatchEvents` streams worker, frontend,
//! node and export changes and newly counted I/O errors.
//!
//! Start it from code:
//!
//! ```no_run
//! # async fn run() -> Result<(), blkmesh_manager::ManagerError> {
//! use blkmesh_manager::{Manager, ManagerConfig};
//! let config = ManagerConfig::new("/var/lib/blkmesh".into()).with_listen("127.0.0.1:0".parse().unwrap());
//! let manager = Manager::bind(config).await?; // loads state, binds listeners
//! println!("listening on {}", manager.local_addr());
//! let running = manager.spawn(); // or: manager.serve(shutdown_future).await
//! running.stop().await?;
//! # Ok(()) }
//! ```

mod error;
mod metrics;
mod service;
mod state;
mod stats;

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blkmesh_proto::v1::export_service_server::ExportServiceServer;
use blkmesh_proto::v1::frontend_service_server::FrontendServiceServer;
use blkmesh_proto::v1::node_service_server::NodeServiceServer;
use blkmesh_proto::v1::stats_service_server::StatsServiceServer;
use blkmesh_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;

pub use error::ManagerError;
pub use state::STATE_FILE;

use service::{ExportApi, FrontendApi, NodeApi, Shared, WorkerApi};
use stats::StatsApi;

/// Default TCP listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// How long a stopping manager waits for open connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Where the manager listens and keeps its state.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// TCP address; port 0 picks a free port (see [`Manager::local_addr`]).
    pub listen: SocketAddr,
    /// Also serve on this unix socket (created with mode 0600).
    pub unix: Option<PathBuf>,
    /// Directory of `state.json`; created if missing.
    pub state_dir: PathBuf,
    /// Serve Prometheus metrics over HTTP on this address (`GET /metrics`);
    /// port 0 picks a free port (see [`Manager::metrics_addr`]).
    pub metrics: Option<SocketAddr>,
}

impl ManagerConfig {
    /// Listen on [`DEFAULT_LISTEN`], no unix socket, state in `state_dir`.
    pub fn new(state_dir: PathBuf) -> Self {
        ManagerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            unix: None,
            state_dir,
            metrics: None,
        }
    }

    /// Sets the TCP listen address.
    pub fn with_listen(mut self, listen: SocketAddr) -> Self {
        self.listen = listen;
        self
    }

    /// Also serves on a unix socket.
    pub fn with_unix(mut self, path: PathBuf) -> Self {
        self.unix = Some(path);
        self
    }

    /// Also serves Prometheus metrics on `addr` (`GET /metrics`).
    pub fn with_metrics(mut self, addr: SocketAddr) -> Self {
        self.metrics = Some(addr);
        self
    }

    /// Path of the state file.
    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join(STATE_FILE)
    }
}

/// A manager with its state loaded and its listeners bound, not yet serving.
pub struct Manager {
    shared: Arc<Shared>,
    tcp: TcpListener,
    local_addr: SocketAddr,
    unix: Option<(UnixListener, PathBuf)>,
    metrics: Option<(TcpListener, SocketAddr)>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("local_addr", &self.local_addr)
            .field("unix", &self.unix.as_ref().map(|(_, p)| p))
            .field("metrics", &self.metrics_addr())
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// Loads the state (refusing a corrupt state file) and binds the listeners.
    pub async fn bind(config: ManagerConfig) -> Result<Manager, ManagerError> {
        std::fs::create_dir_all(&config.state_dir).map_err(|source| ManagerError::StateDir {
            path: config.state_dir.clone(),
            source,
        })?;
        let state_path = config.state_file();
        let state = state::load(&state_path)?;
        tracing::info!(
            state = %state_path.display(),
            nodes = state.graph.len(),
            exports = state.exports.len(),
            workers = state.workers.len(),
            "state loaded"
        );
        let tcp =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ManagerError::BindTcp {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = tcp.local_addr().map_err(|source| ManagerError::BindTcp {
            addr: config.listen,
            source,
        })?;
        let unix = match &config.unix {
            Some(path) => Some((bind_unix(path)?, path.clone())),
            None => None,
        };
        let metrics = match config.metrics {
            Some(addr) => {
                let err = |source| ManagerError::BindMetrics { addr, source };
                let listener = TcpListener::bind(addr).await.map_err(err)?;
                let bound = listener.local_addr().map_err(err)?;
                Some((listener, bound))
            }
            None => None,
        };
        Ok(Manager {
            shared: Shared::new(state, state_path),
            tcp,
            local_addr,
            unix,
            metrics,
        })
    }

    /// The bound TCP address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound metrics address, if metrics are served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(_, a)| *a)
    }

    /// Serves until `shutdown` completes, then ends every registration
    /// stream and stops (waiting at most a few seconds for connections).
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ManagerError> {
        let Manager {
            shared,
            tcp,
            local_addr,
            unix,
            metrics,
        } = self;
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<NodeServiceServer<NodeApi>>().await;
        health.set_serving::<ExportServiceServer<ExportApi>>().await;
        health.set_serving::<WorkerServiceServer<WorkerApi>>().await;
        health
            .set_serving::<FrontendServiceServer<FrontendApi>>()
            .await;
        health.set_serving::<StatsServiceServer<StatsApi>>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;

        let router = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(health_service)
            .add_service(NodeServiceServer::new(NodeApi(shared.clone())))
            .add_service(ExportServiceServer::new(ExportApi(shared.clone())))
            .add_service(WorkerServiceServer::new(WorkerApi(shared.clone())))
            .add_service(FrontendServiceServer::new(FrontendApi(shared.clone())))
            .add_service(StatsServiceServer::new(StatsApi(shared.clone())));
        // Stops by itself when shutdown begins; aborted below in any case.
        let metrics_task = metrics.map(|(listener, addr)| {
            tracing::info!(%addr, "serving metrics");
            tokio::spawn(metrics::serve(listener, shared.clone()))
        });

        let tcp_server = router
            .clone()
            .serve_with_incoming_shutdown(TcpListenerStream::new(tcp), shared.shutdown_signal());
        let unix_path = unix.as_ref().map(|(_, p)| p.clone());
        let unix_signal = shared.shutdown_signal();
        let unix_server = async move {
            match unix {
                Some((listener, _)) => {
                    router
                        .serve_with_incoming_shutdown(
                            UnixListenerStream::new(listener),
                            unix_signal,
                        )
                        .await
                }
                None => Ok(()),
            }
        };
        let servers = async { tokio::try_join!(tcp_server, unix_server).map(|_| ()) };
        tokio::pin!(servers);
        tracing::info!(addr = %local_addr, unix = ?unix_path, "serving");

        let result = tokio::select! {
            r = &mut servers => r.map_err(ManagerError::Serve),
            () = shutdown => {
                tracing::info!("shutting down");
                health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
                shared.begin_shutdown();
                match tokio::time::timeout(SHUTDOWN_GRACE, &mut servers).await {
                    Ok(r) => r.map_err(ManagerError::Serve),
                    Err(_) => {
                        tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; stopping anyway");
                        Ok(())
                    }
                }
            }
        };
        if let Some(task) = metrics_task {
            task.abort();
        }
        if let Some(path) = unix_path {
            let _ = std::fs::remove_file(path);
        }
        result
    }

    /// Serves on a spawned task; stop it with [`RunningManager::stop`].
    pub fn spawn(self) -> RunningManager {
        let addr = self.local_addr;
        let metrics_addr = self.metrics_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(self.serve(async move {
            let _ = rx.await;
        }));
        RunningManager {
            addr,
            metrics_addr,
            stop: Some(tx),
            task,
        }
    }
}

/// A manager serving on a background task. Dropping it stops the manager
/// without waiting.
#[derive(Debug)]
pub struct RunningManager {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ManagerError>>,
}

impl RunningManager {
    /// The bound TCP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound metrics address, if metrics are served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// `http://ADDR`, for tonic clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the manager and waits for it to finish.
    pub async fn stop(mut self) -> Result<(), ManagerError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await.map_err(ManagerError::Join)?
    }
}

impl Drop for RunningManager {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Loads the state, binds and serves until `shutdown` completes.
pub async fn serve(
    config: ManagerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ManagerError> {
    Manager::bind(config).await?.serve(shutdown).await
}

/// Binds a unix listener at `path` with mode 0600, replacing a stale socket
/// but never anything else.
fn bind_unix(path: &Path) -> Result<UnixListener, ManagerError> {
    let err = |source| ManagerError::BindUnix {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
        Ok(_) => {
            return Err(ManagerError::UnixPathTaken {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}
