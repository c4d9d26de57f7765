//! `blkmesh-manager`: the gRPC control plane of blkmesh.
//!
//! The single source of truth for nodes, exports, workers and the
//! queue → worker assignment. It serves `blkmesh.v1` (NodeService,
//! ExportService, WorkerService, FrontendService, StatsService, ZoneService: the
//! operators' services), the agent protocol `blkmesh.agent.v1` and the
//! standard `grpc.health.v1.Health` service, persists its state to
//! `<state-dir>/state.json` after every change and reloads it on start.
//! Each worker and frontend holds one two-way session stream
//! (`AgentService`, `control/agents.rs`) for as long as it runs: a hello
//! up, then reports up and plans and commands down; a closed session
//! marks the agent gone.
//!
//! Every export plan carries a generation (persisted with the export),
//! bumped when a node of its graph is updated (`UpdateNode`) or resized
//! (`ResizeNode`). Frontends report per export and generation whether they
//! serve it (`export_status` on their session, kept in memory); AddExport,
//! UpdateNode and ResizeNode wait up to [`ManagerConfig::apply_timeout`] for
//! those reports, and undo the change when a frontend reports FAILED.
//!
//! Frontends and workers push cumulative counters (`stats` on their session);
//! the manager keeps the latest report per source in memory and serves them
//! summed per export, queue and node (`GetStats`, see `stats.rs` for the
//! rules), and optionally as Prometheus text on `GET /metrics`
//! ([`ManagerConfig::with_metrics`]). `WatchEvents` streams worker, frontend,
//! node and export changes and newly counted I/O errors.
//!
//! Zoned block devices: a `zoned` node emulates a host-managed zoned device
//! over a regular child (`core/zoned.rs` has the graph and placement rules: the
//! queues of an export over a zoned node stay on one worker, its zone layout
//! is fixed). `ZoneService` calls (ReportZones, ManageZone) are forwarded to
//! the frontend serving the export as a `zone_command` with an id on its
//! session; the frontend answers with a `zone_answer` carrying that id
//! within the apply timeout, or the call fails UNAVAILABLE (`api/zones.rs`).
//!
//! Workers that stay away: when a worker's session ends, a
//! grace timer starts ([`ManagerConfig::worker_grace`]); if the worker has
//! not registered again when it runs out, every export queue assigned to it
//! moves to the live workers (least loaded first; the queues of an export
//! that is not spread stay together), the change is persisted and the new
//! plans are pushed to the frontends, which move the queues live. With no
//! live worker the move waits for the first one to register. A worker that
//! comes back later gets no queues back by itself. Workers known from the
//! state file get the same grace from the moment the manager serves.
//!
//! Declarative configuration ([`ManagerConfig::with_config`], `--config`):
//! a TOML file of nodes and exports ([`config`]; `deploy/config/blkmesh.toml`
//! documents every key) applied at start, after the state file is loaded
//! and before anything is served (`reconcile.rs`): the whole file is checked
//! first, with errors located by line, column and field; what the state
//! lacks is added (io_uring files marked `create` are created sparse), what
//! is the same is left alone (a restart with the same file writes nothing),
//! what differs is changed as UpdateNode/ResizeNode would when they could
//! do it live, and refused otherwise; what the file does not name is kept,
//! or removed with `config_prune`. New exports of the file wait in memory
//! (listed PENDING) until a worker registers, then are placed as AddExport
//! places them. Objects of the file are marked `managed_by_config` in the
//! state file. [`size`] and [`rule`] are the size and fault-rule syntax the
//! file shares with blkmeshctl.
//!
//! Security (all off by default): TLS on the TCP listener
//! ([`ManagerConfig::tls`], optionally requiring client certificates) and a
//! bearer token every `blkmesh.v1` and `blkmesh.agent.v1` call must carry
//! ([`ManagerConfig::token`], on the TCP and the unix listener alike). The
//! gRPC health service and `/metrics` stay open. Clients connect through
//! [`blkmesh_proto::client`].
//!
//! Layout, each layer using only the ones before it: `core` (the state in
//! memory and the pure rules and transitions over it, no tonic, no tokio),
//! `store` (the state file, and its one writer, which writes and syncs a
//! change off the lock before anybody sees it), `sessions` (the live
//! workers and frontends), `control` (the state and the sessions behind
//! one lock, and every operation of the services), `api` (one thin tonic
//! adapter per service, and the status code of every error); beside them
//! [`config`] and `reconcile` (the configuration file), `stats` and
//! `metrics`.
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

#![forbid(unsafe_code)]

mod api;
mod auth;
mod control;
mod core;
mod error;
mod metrics;
mod reconcile;
mod sessions;
mod stats;
mod store;

/// The configuration file, sizes and fault rules: the schema crate's
/// (`blkmesh_graph`), which the tools use directly.
pub use blkmesh_graph::{config, rule, size};

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blkmesh_proto::agent::v1::agent_service_server::AgentServiceServer;
use blkmesh_proto::v1::export_service_server::ExportServiceServer;
use blkmesh_proto::v1::frontend_service_server::FrontendServiceServer;
use blkmesh_proto::v1::image_service_server::ImageServiceServer;
use blkmesh_proto::v1::job_service_server::JobServiceServer;
use blkmesh_proto::v1::node_service_server::NodeServiceServer;
use blkmesh_proto::v1::stats_service_server::StatsServiceServer;
use blkmesh_proto::v1::worker_service_server::WorkerServiceServer;
use blkmesh_proto::v1::zone_service_server::ZoneServiceServer;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::server::Router;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

pub use error::ManagerError;
pub use store::file::STATE_FILE;

use api::agents::AgentApi;
use api::exports::ExportApi;
use api::frontends::FrontendApi;
use api::images::ImageApi;
use api::jobs::JobApi;
use api::nodes::NodeApi;
use api::stats::StatsApi;
use api::workers::WorkerApi;
use api::zones::ZoneApi;
use auth::TokenCheck;
use control::hub::Control;

/// Default TCP listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// Default of [`ManagerConfig::apply_timeout`].
pub const DEFAULT_APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Default of [`ManagerConfig::worker_grace`].
pub const DEFAULT_WORKER_GRACE: Duration = Duration::from_secs(3);

/// Longest certificate or key file read, in bytes.
const MAX_PEM_LEN: u64 = 1 << 20;

/// How long a stopping manager waits for open connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Where the manager listens and keeps its state.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// TCP address; port 0 picks a free port (see [`Manager::local_addr`]).
    pub listen: SocketAddr,
    /// Also serve on this unix socket, created with `unix_policy`.
    pub unix: Option<PathBuf>,
    /// Mode, owner and group of the `unix` socket, in force before its
    /// path exists (default 0600, owner and group unchanged).
    pub unix_policy: blkmesh_sandbox::SocketPolicy,
    /// Directory of `state.json`; created if missing.
    pub state_dir: PathBuf,
    /// Serve Prometheus metrics over HTTP on this address (`GET /metrics`);
    /// port 0 picks a free port (see [`Manager::metrics_addr`]).
    pub metrics: Option<SocketAddr>,
    /// How long AddExport, UpdateNode and ResizeNode wait for a connected
    /// frontend to report that it applied the new plan.
    pub apply_timeout: Duration,
    /// How long a worker whose registration ended may take to come back
    /// before its queues move to the live workers.
    pub worker_grace: Duration,
    /// Serve TLS on the TCP listener (the unix socket stays plaintext).
    pub tls: Option<TlsConfig>,
    /// Require this bearer token on every `blkmesh.v1` call.
    pub token: Option<TokenSource>,
    /// Apply this configuration file (TOML, see [`config`]) at start.
    pub config: Option<PathBuf>,
    /// With `config`: remove the nodes and exports it does not name.
    pub config_prune: bool,
    /// Give the images the configuration creates to this uid and gid: the
    /// workers' user, when it is not the manager's (docker-compose).
    pub image_owner: Option<(u32, u32)>,
    /// Directories in which AddNode may follow the backing file an image
    /// header names (`backing_from_header`).
    pub image_dirs: Vec<PathBuf>,
}

/// TLS files of the manager (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key of the leaf certificate.
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// Where the bearer token comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A file holding the token (surrounding whitespace ignored), read at startup.
    File(PathBuf),
    /// The token itself.
    Value(String),
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::File(p) => f.debug_tuple("File").field(p).finish(),
            TokenSource::Value(_) => f.write_str("Value(<redacted>)"),
        }
    }
}

impl TokenSource {
    /// The token, checked like clients check theirs.
    fn load(&self) -> Result<String, ManagerError> {
        match self {
            TokenSource::File(path) => Ok(blkmesh_proto::client::load_token(path)?),
            TokenSource::Value(t) => {
                blkmesh_proto::client::validate_token(t).map_err(|reason| {
                    blkmesh_proto::client::TokenError::Invalid { path: None, reason }
                })?;
                Ok(t.clone())
            }
        }
    }
}

impl ManagerConfig {
    /// Listen on [`DEFAULT_LISTEN`], no unix socket, state in `state_dir`.
    pub fn new(state_dir: PathBuf) -> Self {
        ManagerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            unix: None,
            unix_policy: blkmesh_sandbox::SocketPolicy::default(),
            state_dir,
            metrics: None,
            apply_timeout: DEFAULT_APPLY_TIMEOUT,
            worker_grace: DEFAULT_WORKER_GRACE,
            tls: None,
            token: None,
            config: None,
            config_prune: false,
            image_owner: None,
            image_dirs: Vec::new(),
        }
    }

    /// Applies the configuration file at `path` at start; with `prune`,
    /// nodes and exports it does not name are removed.
    pub fn with_config(mut self, path: PathBuf, prune: bool) -> Self {
        self.config = Some(path);
        self.config_prune = prune;
        self
    }

    /// Sets how long a lost worker may take to come back before its queues move.
    pub fn with_worker_grace(mut self, grace: Duration) -> Self {
        self.worker_grace = grace;
        self
    }

    /// Serves TLS on the TCP listener with this certificate and key (PEM).
    pub fn with_tls(mut self, cert: PathBuf, key: PathBuf) -> Self {
        self.tls = Some(TlsConfig {
            cert,
            key,
            client_ca: None,
        });
        self
    }

    /// Requires client certificates signed by `ca` (PEM); needs [`ManagerConfig::with_tls`].
    pub fn with_client_ca(mut self, ca: PathBuf) -> Self {
        if let Some(tls) = &mut self.tls {
            tls.client_ca = Some(ca);
        }
        self
    }

    /// Requires the token in `path` on every call.
    pub fn with_token_file(mut self, path: PathBuf) -> Self {
        self.token = Some(TokenSource::File(path));
        self
    }

    /// Requires `token` on every call.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(TokenSource::Value(token.into()));
        self
    }

    /// Sets how long calls wait for frontends to apply a plan.
    pub fn with_apply_timeout(mut self, timeout: Duration) -> Self {
        self.apply_timeout = timeout;
        self
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
    control: Arc<Control>,
    tls: Option<ServerTlsConfig>,
    token: TokenCheck,
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
            .field("tls", &self.tls.is_some())
            .field("token", &self.token)
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
        // Security files first: a typo there should not wait for anything.
        let tls = config.tls.as_ref().map(load_tls).transpose()?;
        let token = config.token.as_ref().map(TokenSource::load).transpose()?;
        let state_path = config.state_file();
        let state = store::file::load(&state_path)?;
        tracing::info!(
            state = %state_path.display(),
            nodes = state.graph.len(),
            exports = state.exports.len(),
            workers = state.workers.len(),
            "state loaded"
        );
        let (state, waiting) = apply_config(&config, state, &state_path)?;
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
            Some(path) => Some((bind_unix(path, &config.unix_policy)?, path.clone())),
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
        let control = Control::new(state, state_path, config.apply_timeout, config.worker_grace);
        if let Some(owner) = config.image_owner {
            let _ = control.image_owner.set(owner);
        }
        let _ = control.image_dirs.set(config.image_dirs.clone());
        control.set_config_waiting(waiting);
        Ok(Manager {
            control,
            tls,
            token: TokenCheck::new(token.as_deref()),
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

    /// `http://ADDR`, or `https://ADDR` when serving TLS.
    pub fn url(&self) -> String {
        url(self.local_addr, self.tls.is_some())
    }

    /// Serves until `shutdown` completes, then ends every agent session
    /// and stops (waiting at most a few seconds for connections).
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ManagerError> {
        let Manager {
            control,
            tls,
            token,
            tcp,
            local_addr,
            unix,
            metrics,
        } = self;
        let tls_on = tls.is_some();
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<NodeServiceServer<NodeApi>>().await;
        health.set_serving::<ExportServiceServer<ExportApi>>().await;
        health.set_serving::<WorkerServiceServer<WorkerApi>>().await;
        health
            .set_serving::<FrontendServiceServer<FrontendApi>>()
            .await;
        health.set_serving::<StatsServiceServer<StatsApi>>().await;
        health.set_serving::<ZoneServiceServer<ZoneApi>>().await;
        health.set_serving::<ImageServiceServer<ImageApi>>().await;
        health.set_serving::<JobServiceServer<JobApi>>().await;
        health.set_serving::<AgentServiceServer<AgentApi>>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;

        // TLS applies to every connection a server accepts, so the unix
        // socket gets a server of its own.
        let mut tcp_builder = server_builder();
        if let Some(tls) = tls {
            tcp_builder = tcp_builder.tls_config(tls).map_err(ManagerError::Tls)?;
        }
        let tcp_router = routes(tcp_builder, &control, &token, health_service.clone());
        let unix_router = routes(server_builder(), &control, &token, health_service);
        // Stops by itself when shutdown begins; aborted below in any case.
        let metrics_task = metrics.map(|(listener, addr)| {
            tracing::info!(%addr, "serving metrics");
            tokio::spawn(metrics::serve(listener, control.clone()))
        });

        let tcp_server = tcp_router
            .serve_with_incoming_shutdown(TcpListenerStream::new(tcp), control.shutdown_signal());
        let unix_path = unix.as_ref().map(|(_, p)| p.clone());
        let unix_signal = control.shutdown_signal();
        let unix_server = async move {
            match unix {
                Some((listener, _)) => {
                    unix_router
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
        tracing::info!(
            addr = %local_addr,
            unix = ?unix_path,
            tls = tls_on,
            token = ?token,
            "serving"
        );
        control.arm_startup_timers();

        let result = tokio::select! {
            r = &mut servers => r.map_err(ManagerError::Serve),
            () = shutdown => {
                tracing::info!("shutting down");
                health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
                control.begin_shutdown();
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
        let tls = self.tls.is_some();
        let metrics_addr = self.metrics_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(self.serve(async move {
            let _ = rx.await;
        }));
        RunningManager {
            addr,
            tls,
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
    tls: bool,
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

    /// `http://ADDR` (`https://ADDR` when serving TLS), for tonic clients.
    pub fn url(&self) -> String {
        url(self.addr, self.tls)
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

/// Applies `config.config` (if any) to `state` and persists the result
/// when it changed: the reconciled state and the exports waiting for a worker.
fn apply_config(
    config: &ManagerConfig,
    state: core::state::State,
    state_path: &Path,
) -> Result<
    (
        core::state::State,
        Vec<blkmesh_proto::v1::VhostUserBlkExport>,
    ),
    ManagerError,
> {
    let Some(path) = &config.config else {
        if !state.config_nodes.is_empty() || !state.config_exports.is_empty() {
            tracing::info!(
                nodes = ?state.config_nodes,
                exports = ?state.config_exports,
                "these came from a configuration file; started without --config, they are kept as they are"
            );
        }
        return Ok((state, Vec::new()));
    };
    let file = path.display().to_string();
    let refused = |errors| ManagerError::Config {
        file: file.clone(),
        errors,
    };
    // The file on its own first (as `blkmeshctl config check`), then
    // against the state.
    let parsed = config::check(path).map_err(refused)?;
    let opts = reconcile::Options {
        fs: true,
        prune: config.config_prune,
        image_owner: config.image_owner,
    };
    let outcome = reconcile::reconcile(&state, &parsed, opts).map_err(refused)?;
    if outcome.state != state {
        store::file::save(state_path, &outcome.state).map_err(|source| {
            ManagerError::SaveState {
                path: state_path.to_path_buf(),
                source,
            }
        })?;
    }
    outcome.summary.log(&file);
    Ok((outcome.state, outcome.waiting))
}

fn url(addr: SocketAddr, tls: bool) -> String {
    format!("{}://{addr}", if tls { "https" } else { "http" })
}

fn server_builder() -> Server {
    Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
}

/// Every service on `builder`: health open, the `blkmesh.v1` and
/// `blkmesh.agent.v1` services behind `token`.
fn routes(
    mut builder: Server,
    control: &Arc<Control>,
    token: &TokenCheck,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Router {
    let t = || token.clone();
    builder
        .add_service(health)
        .add_service(NodeServiceServer::with_interceptor(
            NodeApi(control.clone()),
            t(),
        ))
        .add_service(ExportServiceServer::with_interceptor(
            ExportApi(control.clone()),
            t(),
        ))
        .add_service(WorkerServiceServer::with_interceptor(
            WorkerApi(control.clone()),
            t(),
        ))
        .add_service(FrontendServiceServer::with_interceptor(
            FrontendApi(control.clone()),
            t(),
        ))
        .add_service(StatsServiceServer::with_interceptor(
            StatsApi(control.clone()),
            t(),
        ))
        .add_service(ZoneServiceServer::with_interceptor(
            ZoneApi(control.clone()),
            t(),
        ))
        .add_service(ImageServiceServer::with_interceptor(
            ImageApi(control.clone()),
            t(),
        ))
        .add_service(JobServiceServer::with_interceptor(
            JobApi(control.clone()),
            t(),
        ))
        .add_service(AgentServiceServer::with_interceptor(
            AgentApi(control.clone()),
            t(),
        ))
}

/// Reads the TLS files and checks that they make a usable server config.
fn load_tls(tls: &TlsConfig) -> Result<ServerTlsConfig, ManagerError> {
    let read = |what: &'static str, path: &Path| {
        read_pem(path).map_err(|source| ManagerError::ReadTls {
            what,
            path: path.to_path_buf(),
            source,
        })
    };
    let cert = read("certificate", &tls.cert)?;
    let key = read("key", &tls.key)?;
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if let Some(ca) = &tls.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read("client CA certificate", ca)?));
    }
    // Builds the acceptor now, so a bad certificate or key fails at startup.
    Server::builder()
        .tls_config(config.clone())
        .map_err(ManagerError::Tls)?;
    Ok(config)
}

fn read_pem(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_PEM_LEN + 1)
        .read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_PEM_LEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_PEM_LEN} bytes"),
        ));
    }
    Ok(buf)
}

/// Binds a unix listener at `path` with `policy`'s mode (0600 by default)
/// from the moment the path exists, replacing a stale socket but never
/// anything else.
fn bind_unix(
    path: &Path,
    policy: &blkmesh_sandbox::SocketPolicy,
) -> Result<UnixListener, ManagerError> {
    let err = |source| ManagerError::BindUnix {
        path: path.to_path_buf(),
        source,
    };
    let fd = policy
        .listen_unix(path, blkmesh_sandbox::UnixSocketKind::Stream, 1024)
        .map_err(|e| match e {
            blkmesh_sandbox::SandboxError::PathTaken(_) => ManagerError::UnixPathTaken {
                path: path.to_path_buf(),
            },
            e => ManagerError::Sandbox(e),
        })?;
    let std = std::os::unix::net::UnixListener::from(fd);
    std.set_nonblocking(true).map_err(err)?;
    UnixListener::from_std(std).map_err(err)
}
