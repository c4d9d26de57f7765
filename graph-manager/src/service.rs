//! The gRPC services and the shared, locked manager state behind them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use blkmesh_graph::{
    driver_name, raw_window_size, validate_export, validate_name, validate_node,
    validate_socket_path, GraphError, ObjectKind, SECTOR_SIZE,
};
use blkmesh_proto::v1::event::Kind as EventKind;
use blkmesh_proto::v1::export_service_server::ExportService;
use blkmesh_proto::v1::frontend_event::Event as FrontendEventKind;
use blkmesh_proto::v1::frontend_service_server::FrontendService;
use blkmesh_proto::v1::node_service_server::NodeService;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::worker_event::Event as WorkerEventKind;
use blkmesh_proto::v1::worker_service_server::WorkerService;
use blkmesh_proto::v1::Event;
use blkmesh_proto::v1::{
    AddExportRequest, AddExportResponse, AddNodeRequest, AddNodeResponse, DrainWorkerRequest,
    DrainWorkerResponse, ExportInfo, ExportPlan, FrontendEvent, FrontendHello, GetNodeRequest,
    GetNodeResponse, ListExportsRequest, ListExportsResponse, ListNodesRequest, ListNodesResponse,
    ListWorkersRequest, ListWorkersResponse, MoveNodeRequest, MoveNodeResponse, MoveQueueRequest,
    MoveQueueResponse, MovedQueue, NodeInfo, NodeSpec, QueueAssignment, QueueEndpoint,
    RemoveExportRequest, RemoveExportResponse, RemoveNodeRequest, RemoveNodeResponse,
    WorkerAccepted, WorkerEvent, WorkerHello, WorkerInfo, WorkerState,
};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::state::{self, ExportRecord, State, WorkerRecord};
use crate::stats::{self as stats_mod, StatsStore};

type EventTx<T> = mpsc::UnboundedSender<Result<T, Status>>;
/// A server-streaming response.
pub(crate) type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A registered frontend.
struct FrontendConn {
    session: u64,
    /// `None` once the frontend's stream is gone.
    tx: Option<EventTx<FrontendEvent>>,
}

/// Everything behind the manager's lock.
struct Inner {
    state: State,
    /// Live workers: name → registration session.
    live_workers: BTreeMap<String, u64>,
    /// Frontends by name, alive (with a sender) or gone.
    frontends: BTreeMap<String, FrontendConn>,
    next_session: u64,
    shutting_down: bool,
}

/// The manager's state, shared by all services.
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    state_path: PathBuf,
    shutdown: watch::Sender<bool>,
    /// Latest stats report per source (memory only; own lock, never held
    /// together with `inner`).
    stats: Mutex<StatsStore>,
    /// The event feed (`StatsService.WatchEvents`).
    events: broadcast::Sender<Event>,
}

/// Worker counts for `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct WorkerCounts {
    pub alive: usize,
    pub gone: usize,
}

impl Shared {
    pub(crate) fn new(state: State, state_path: PathBuf) -> Arc<Self> {
        Arc::new(Shared {
            inner: Mutex::new(Inner {
                state,
                live_workers: BTreeMap::new(),
                frontends: BTreeMap::new(),
                next_session: 1,
                shutting_down: false,
            }),
            state_path,
            shutdown: watch::channel(false).0,
            stats: Mutex::new(StatsStore::default()),
            events: stats_mod::event_channel(),
        })
    }

    /// The stats store.
    pub(crate) fn stats(&self) -> MutexGuard<'_, StatsStore> {
        // Every change to the store is a single insert or remove.
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends an event to every `WatchEvents` subscriber (none: dropped).
    pub(crate) fn emit(&self, kind: EventKind) {
        let _ = self.events.send(stats_mod::event(kind));
    }

    /// A receiver of every event from now on.
    pub(crate) fn subscribe_events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The configured exports (with their queue counts) and nodes.
    pub(crate) fn stats_config(&self) -> stats_mod::Config {
        let inner = self.lock();
        stats_mod::Config {
            exports: inner
                .state
                .exports
                .values()
                .map(|r| (r.export.id.clone(), r.export.num_queues))
                .collect(),
            nodes: inner.state.graph.iter().map(|s| s.name.clone()).collect(),
        }
    }

    /// Registered workers, alive and gone.
    pub(crate) fn worker_counts(&self) -> WorkerCounts {
        let inner = self.lock();
        let alive = inner
            .state
            .workers
            .keys()
            .filter(|w| inner.live_workers.contains_key(*w))
            .count();
        WorkerCounts {
            alive,
            gone: inner.state.workers.len() - alive,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-updated:
        // every change is built on a copy and swapped in whole.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Persists `next` and makes it the current state.
    fn commit(&self, inner: &mut Inner, next: State) -> Result<(), ApiError> {
        state::save(&self.state_path, &next).map_err(|source| ApiError::Persist {
            path: self.state_path.clone(),
            source,
        })?;
        inner.state = next;
        Ok(())
    }

    /// Ends every registration stream so the server can shut down.
    pub(crate) fn begin_shutdown(&self) {
        let mut inner = self.lock();
        inner.shutting_down = true;
        for conn in inner.frontends.values_mut() {
            conn.tx = None;
        }
        self.shutdown.send_replace(true);
    }

    /// A future that completes once shutdown has begun.
    pub(crate) fn shutdown_signal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.shutdown.subscribe();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    }

    fn broadcast(inner: &mut Inner, event: FrontendEventKind) {
        for (name, conn) in inner.frontends.iter_mut() {
            if let Some(tx) = &conn.tx {
                if tx
                    .send(Ok(FrontendEvent {
                        event: Some(event.clone()),
                    }))
                    .is_err()
                {
                    tracing::debug!(frontend = %name, "frontend stream closed while sending");
                }
            }
        }
    }

    fn worker_gone(&self, name: &str, session: u64) {
        let mut inner = self.lock();
        if inner.live_workers.get(name) == Some(&session) {
            inner.live_workers.remove(name);
            tracing::info!(worker = %name, "worker gone");
            self.emit(EventKind::WorkerLeft(name.to_string()));
        }
    }

    fn frontend_gone(&self, name: &str, session: u64) {
        let mut inner = self.lock();
        if let Some(conn) = inner.frontends.get_mut(name) {
            if conn.session == session && conn.tx.is_some() {
                conn.tx = None;
                tracing::info!(frontend = %name, "frontend gone");
                self.emit(EventKind::FrontendLeft(name.to_string()));
            }
        }
    }
}

// ----- views -----

fn node_info(state: &State, spec: &NodeSpec) -> NodeInfo {
    let mut used_by: Vec<String> = state
        .graph
        .users_of(&spec.name)
        .into_iter()
        .map(str::to_string)
        .collect();
    used_by.extend(state.exports_of_node(&spec.name).map(str::to_string));
    NodeInfo {
        spec: Some(spec.clone()),
        size: state.sizes.get(&spec.name).copied().unwrap_or(0),
        read_only: state.graph.is_read_only(&spec.name).unwrap_or(false),
        used_by,
    }
}

fn export_info(state: &State, rec: &ExportRecord) -> ExportInfo {
    ExportInfo {
        export: Some(rec.export.clone()),
        queues: rec
            .queues
            .iter()
            .enumerate()
            .map(|(i, w)| QueueAssignment {
                queue: i as u32,
                worker: w.clone(),
            })
            .collect(),
        size: state.sizes.get(&rec.export.node).copied().unwrap_or(0),
    }
}

fn export_plan(state: &State, rec: &ExportRecord) -> Option<ExportPlan> {
    let nodes = match state.graph.subtree(&rec.export.node) {
        Ok(nodes) => nodes,
        Err(e) => {
            tracing::error!(export = %rec.export.id, "cannot build plan: {e}");
            return None;
        }
    };
    Some(ExportPlan {
        export: Some(rec.export.clone()),
        nodes,
        queues: rec
            .queues
            .iter()
            .enumerate()
            .map(|(i, w)| QueueEndpoint {
                queue: i as u32,
                worker: w.clone(),
                worker_socket: state
                    .workers
                    .get(w)
                    .map(|r| r.socket.clone())
                    .unwrap_or_default(),
            })
            .collect(),
    })
}

/// What a path turned out to be, for error messages.
fn file_kind(ft: &std::fs::FileType) -> &'static str {
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Size in bytes of a regular file or block device, rounded down to whole
/// sectors. Errors name `node.io_uring.path`.
fn probe_io_uring_path(path: &str) -> Result<u64, GraphError> {
    const FIELD: &str = "node.io_uring.path";
    let meta = std::fs::metadata(path)
        .map_err(|e| GraphError::invalid(FIELD, format!("cannot stat {path:?}: {e}")))?;
    let ft = meta.file_type();
    let size = if ft.is_file() {
        meta.len()
    } else if ft.is_block_device() {
        let mut f = File::open(path)
            .map_err(|e| GraphError::invalid(FIELD, format!("cannot open {path:?}: {e}")))?;
        f.seek(SeekFrom::End(0)).map_err(|e| {
            GraphError::invalid(FIELD, format!("cannot get the size of {path:?}: {e}"))
        })?
    } else {
        return Err(GraphError::invalid(
            FIELD,
            format!(
                "must be a regular file or block device ({path:?} is {})",
                file_kind(&ft)
            ),
        ));
    };
    Ok(size - size % SECTOR_SIZE)
}

/// What the path of a device-backed protocol node must be.
#[derive(Debug, Clone, Copy)]
enum DeviceKind {
    /// A character device (NVMe generic device, vhost-vdpa device).
    CharDevice,
    /// A listening unix socket (a vhost-user-blk target).
    Socket,
}

/// Checks that `path` exists and is a `kind`, without opening it: a
/// vhost-user target may serve a single connection, and opening a device
/// is the worker's job. Errors name `field`.
fn probe_device_path(field: &'static str, path: &str, kind: DeviceKind) -> Result<(), GraphError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| GraphError::invalid(field, format!("cannot stat {path:?}: {e}")))?;
    let ft = meta.file_type();
    let (ok, want) = match kind {
        DeviceKind::CharDevice => (ft.is_char_device(), "a character device"),
        DeviceKind::Socket => (ft.is_socket(), "a unix socket"),
    };
    if ok {
        Ok(())
    } else {
        Err(GraphError::invalid(
            field,
            format!("must be {want} ({path:?} is {})", file_kind(&ft)),
        ))
    }
}

/// Runs a filesystem probe off the async runtime.
async fn probe_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, GraphError> + Send + 'static,
) -> Result<T, ApiError> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??)
}

// ----- NodeService -----

/// `blkmesh.v1.NodeService`.
pub(crate) struct NodeApi(pub Arc<Shared>);

impl NodeApi {
    async fn add(&self, spec: NodeSpec) -> Result<NodeInfo, ApiError> {
        validate_node(&spec)?;
        self.0.lock().state.graph.check_add(&spec)?;
        // Filesystem checks run before the lock is taken again; the graph
        // rules are checked once more under it.
        let probed = match &spec.driver {
            Some(Driver::IoUring(o)) => {
                let path = o.path.clone();
                Some(probe_blocking(move || probe_io_uring_path(&path)).await?)
            }
            Some(Driver::NvmeIoUring(o)) => {
                let path = o.path.clone();
                probe_blocking(move || {
                    probe_device_path("node.nvme_io_uring.path", &path, DeviceKind::CharDevice)
                })
                .await?;
                None
            }
            Some(Driver::VirtioBlkVhostUser(o)) => {
                let path = o.path.clone();
                probe_blocking(move || {
                    probe_device_path("node.virtio_blk_vhost_user.path", &path, DeviceKind::Socket)
                })
                .await?;
                None
            }
            Some(Driver::VirtioBlkVhostVdpa(o)) => {
                let path = o.path.clone();
                probe_blocking(move || {
                    probe_device_path(
                        "node.virtio_blk_vhost_vdpa.path",
                        &path,
                        DeviceKind::CharDevice,
                    )
                })
                .await?;
                None
            }
            None
            | Some(Driver::Null(_))
            | Some(Driver::Raw(_))
            | Some(Driver::Throttle(_))
            | Some(Driver::FaultInjection(_)) => None,
        };
        let mut inner = self.0.lock();
        let mut next = inner.state.clone();
        next.graph.add(spec.clone())?;
        let child_size = |child: &str| next.sizes.get(child).copied().unwrap_or(0);
        // 0 = not known until a worker opens the node (NodeInfo.size).
        let size = match &spec.driver {
            None => return Err(ApiError::Missing("node.driver")),
            Some(Driver::IoUring(_)) => probed.unwrap_or(0),
            Some(Driver::Null(o)) => o.size,
            Some(Driver::NvmeIoUring(_)) => 0,
            Some(Driver::VirtioBlkVhostUser(_)) => 0,
            Some(Driver::VirtioBlkVhostVdpa(_)) => 0,
            Some(Driver::Raw(o)) => match child_size(&o.child) {
                // The worker checks that the window fits when it opens the child.
                0 => o.size,
                n => raw_window_size(o, n)?,
            },
            Some(Driver::Throttle(o)) => child_size(&o.child),
            Some(Driver::FaultInjection(o)) => child_size(&o.child),
        };
        next.sizes.insert(spec.name.clone(), size);
        self.0.commit(&mut inner, next)?;
        tracing::info!(node = %spec.name, driver = driver_name(&spec), size, "node added");
        self.0.emit(EventKind::NodeAdded(spec.name.clone()));
        Ok(node_info(&inner.state, &spec))
    }

    fn remove(&self, name: &str) -> Result<(), ApiError> {
        let mut inner = self.0.lock();
        if !inner.state.graph.contains(name) {
            return Err(GraphError::NotFound {
                field: "name",
                kind: ObjectKind::Node,
                name: name.to_string(),
            }
            .into());
        }
        let mut users: Vec<String> = inner
            .state
            .graph
            .users_of(name)
            .iter()
            .map(|u| format!("node {u:?}"))
            .collect();
        users.extend(
            inner
                .state
                .exports_of_node(name)
                .map(|e| format!("export {e:?}")),
        );
        if !users.is_empty() {
            return Err(GraphError::InUse {
                kind: ObjectKind::Node,
                name: name.to_string(),
                users,
            }
            .into());
        }
        let mut next = inner.state.clone();
        next.graph.remove(name)?;
        next.sizes.remove(name);
        self.0.commit(&mut inner, next)?;
        tracing::info!(node = %name, "node removed");
        self.0.emit(EventKind::NodeRemoved(name.to_string()));
        Ok(())
    }
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn add_node(
        &self,
        request: Request<AddNodeRequest>,
    ) -> Result<Response<AddNodeResponse>, Status> {
        let spec = request.into_inner().node.ok_or(ApiError::Missing("node"))?;
        let info = self.add(spec).await?;
        Ok(Response::new(AddNodeResponse { node: Some(info) }))
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        self.remove(&request.into_inner().name)?;
        Ok(Response::new(RemoveNodeResponse {}))
    }

    async fn list_nodes(
        &self,
        _request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let inner = self.0.lock();
        let nodes = inner
            .state
            .graph
            .iter()
            .map(|spec| node_info(&inner.state, spec))
            .collect();
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn get_node(
        &self,
        request: Request<GetNodeRequest>,
    ) -> Result<Response<GetNodeResponse>, Status> {
        let name = request.into_inner().name;
        let inner = self.0.lock();
        let spec = inner
            .state
            .graph
            .get(&name)
            .ok_or_else(|| GraphError::NotFound {
                field: "name",
                kind: ObjectKind::Node,
                name: name.clone(),
            })
            .map_err(ApiError::from)?;
        Ok(Response::new(GetNodeResponse {
            node: Some(node_info(&inner.state, spec)),
        }))
    }
}

// ----- ExportService -----

/// `blkmesh.v1.ExportService`.
pub(crate) struct ExportApi(pub Arc<Shared>);

impl ExportApi {
    fn add(&self, export: &blkmesh_proto::v1::VhostUserBlkExport) -> Result<ExportInfo, ApiError> {
        let export = validate_export(export)?;
        let mut inner = self.0.lock();
        let state = &inner.state;
        if state.exports.contains_key(&export.id) {
            return Err(GraphError::AlreadyExists {
                field: "export.id",
                kind: ObjectKind::Export,
                name: export.id,
            }
            .into());
        }
        if let Some(other) = state
            .exports
            .values()
            .find(|r| r.export.socket == export.socket)
        {
            return Err(GraphError::Duplicate {
                field: "export.socket",
                problem: format!(
                    "socket {:?} is already used by export {:?}",
                    export.socket, other.export.id
                ),
            }
            .into());
        }
        if !state.graph.contains(&export.node) {
            return Err(GraphError::NotFound {
                field: "export.node",
                kind: ObjectKind::Node,
                name: export.node,
            }
            .into());
        }
        if let Some(other) = state.exports_of_node(&export.node).next() {
            return Err(GraphError::precondition(
                "export.node",
                format!(
                    "node {:?} is already exported by export {other:?}",
                    export.node
                ),
            )
            .into());
        }
        if export.writable && state.graph.is_read_only(&export.node)? {
            return Err(GraphError::precondition(
                "export.writable",
                format!(
                    "node {:?} is read-only; a writable export needs a writable node",
                    export.node
                ),
            )
            .into());
        }
        if export.spread_queues {
            if let Some(node) = state.graph.subtree(&export.node)?.iter().find(
                |spec| matches!(&spec.driver, Some(Driver::Throttle(o)) if o.group.is_empty()),
            ) {
                return Err(GraphError::precondition(
                    "export.spread_queues",
                    format!(
                        "node {:?} is a throttle without a group: its buckets are per \
                         worker, so spreading the queues would multiply its limits \
                         (give it a group, or do not spread)",
                        node.name
                    ),
                )
                .into());
            }
        }
        // Live workers by assigned queues, then name (the map is sorted).
        // All queues go to the first; spread exports go round robin.
        let counts = state.queue_counts();
        let mut live: Vec<(usize, &String)> = inner
            .live_workers
            .keys()
            .map(|w| (counts.get(w.as_str()).copied().unwrap_or(0), w))
            .collect();
        live.sort();
        if live.is_empty() {
            return Err(ApiError::NoLiveWorker);
        }
        let n = export.num_queues as usize;
        let queues: Vec<String> = if export.spread_queues {
            (0..n).map(|i| live[i % live.len()].1.clone()).collect()
        } else {
            vec![live[0].1.clone(); n]
        };
        let rec = ExportRecord { queues, export };
        let mut next = inner.state.clone();
        next.exports.insert(rec.export.id.clone(), rec.clone());
        self.0.commit(&mut inner, next)?;
        tracing::info!(
            export = %rec.export.id,
            node = %rec.export.node,
            workers = ?rec.queues,
            "export added"
        );
        self.0.emit(EventKind::ExportAdded(rec.export.id.clone()));
        if let Some(plan) = export_plan(&inner.state, &rec) {
            Shared::broadcast(&mut inner, FrontendEventKind::Upsert(plan));
        }
        Ok(export_info(&inner.state, &rec))
    }

    fn remove(&self, id: &str) -> Result<(), ApiError> {
        let mut inner = self.0.lock();
        if !inner.state.exports.contains_key(id) {
            return Err(GraphError::NotFound {
                field: "id",
                kind: ObjectKind::Export,
                name: id.to_string(),
            }
            .into());
        }
        let mut next = inner.state.clone();
        next.exports.remove(id);
        self.0.commit(&mut inner, next)?;
        tracing::info!(export = %id, "export removed");
        self.0.emit(EventKind::ExportRemoved(id.to_string()));
        Shared::broadcast(&mut inner, FrontendEventKind::Remove(id.to_string()));
        Ok(())
    }
}

#[tonic::async_trait]
impl ExportService for ExportApi {
    async fn add_export(
        &self,
        request: Request<AddExportRequest>,
    ) -> Result<Response<AddExportResponse>, Status> {
        let export = request
            .into_inner()
            .export
            .ok_or(ApiError::Missing("export"))?;
        let info = self.add(&export)?;
        Ok(Response::new(AddExportResponse { export: Some(info) }))
    }

    async fn remove_export(
        &self,
        request: Request<RemoveExportRequest>,
    ) -> Result<Response<RemoveExportResponse>, Status> {
        self.remove(&request.into_inner().id)?;
        Ok(Response::new(RemoveExportResponse {}))
    }

    async fn list_exports(
        &self,
        _request: Request<ListExportsRequest>,
    ) -> Result<Response<ListExportsResponse>, Status> {
        let inner = self.0.lock();
        let exports = inner
            .state
            .exports
            .values()
            .map(|r| export_info(&inner.state, r))
            .collect();
        Ok(Response::new(ListExportsResponse { exports }))
    }
}

// ----- WorkerService -----

/// `blkmesh.v1.WorkerService`.
pub(crate) struct WorkerApi(pub Arc<Shared>);

impl WorkerApi {
    fn register(&self, hello: WorkerHello) -> Result<EventStream<WorkerEvent>, ApiError> {
        validate_name("name", &hello.name)?;
        validate_socket_path("socket", &hello.socket)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let session = {
            let mut inner = self.0.lock();
            if inner.shutting_down {
                return Err(ApiError::ShuttingDown);
            }
            if inner.live_workers.contains_key(&hello.name) {
                return Err(ApiError::AlreadyRegistered {
                    kind: "worker",
                    name: hello.name,
                });
            }
            let record = WorkerRecord {
                socket: hello.socket.clone(),
                pid: hello.pid,
            };
            let previous = inner.state.workers.get(&hello.name).cloned();
            if previous.as_ref() != Some(&record) {
                let mut next = inner.state.clone();
                next.workers.insert(hello.name.clone(), record);
                self.0.commit(&mut inner, next)?;
            }
            let session = inner.next_session;
            inner.next_session += 1;
            inner.live_workers.insert(hello.name.clone(), session);
            tracing::info!(worker = %hello.name, socket = %hello.socket, pid = hello.pid, "worker registered");
            self.0.emit(EventKind::WorkerJoined(hello.name.clone()));
            // Send `accepted` before any other event could be queued.
            let _ = tx.send(Ok(WorkerEvent {
                event: Some(WorkerEventKind::Accepted(WorkerAccepted {})),
            }));
            if previous.is_some_and(|p| p.socket != hello.socket) {
                let plans: Vec<ExportPlan> = inner
                    .state
                    .exports
                    .values()
                    .filter(|r| r.queues.contains(&hello.name))
                    .filter_map(|r| export_plan(&inner.state, r))
                    .collect();
                for plan in plans {
                    Shared::broadcast(&mut inner, FrontendEventKind::Upsert(plan));
                }
            }
            session
        };
        let shared = self.0.clone();
        let name = hello.name;
        let mut shutdown = self.0.shutdown.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = tx.closed() => {}
                _ = shutdown.wait_for(|v| *v) => {}
            }
            drop(tx);
            shared.worker_gone(&name, session);
        });
        Ok(Box::pin(UnboundedReceiverStream::new(rx)))
    }

    /// Moves queue `queue` of export `id` to `worker` (a live worker).
    fn move_queue(&self, id: &str, queue: u32, worker: &str) -> Result<ExportInfo, ApiError> {
        let mut inner = self.0.lock();
        let rec = inner
            .state
            .exports
            .get(id)
            .ok_or_else(|| GraphError::NotFound {
                field: "export",
                kind: ObjectKind::Export,
                name: id.to_string(),
            })?;
        let num_queues = rec.export.num_queues;
        if queue >= num_queues {
            return Err(GraphError::invalid(
                "queue",
                format!("export {id:?} has {num_queues} queues (0..{num_queues}); got {queue}"),
            )
            .into());
        }
        Self::check_target(&inner, worker)?;
        let from = rec.queues[queue as usize].clone();
        if from == worker {
            return Ok(export_info(&inner.state, rec));
        }
        let mut next = inner.state.clone();
        if let Some(r) = next.exports.get_mut(id) {
            r.queues[queue as usize] = worker.to_string();
        }
        self.0.commit(&mut inner, next)?;
        tracing::info!(export = %id, queue, %from, to = %worker, "queue moved");
        Self::push_plans(&mut inner, &[id]);
        let rec = &inner.state.exports[id];
        Ok(export_info(&inner.state, rec))
    }

    /// Checks that `worker` is known and alive, as a move destination.
    fn check_target(inner: &Inner, worker: &str) -> Result<(), ApiError> {
        if !inner.state.workers.contains_key(worker) {
            return Err(ApiError::UnknownWorker {
                field: "worker",
                name: worker.to_string(),
            });
        }
        if !inner.live_workers.contains_key(worker) {
            return Err(GraphError::precondition(
                "worker",
                format!("worker {worker:?} is not alive; queues can only move to a live worker"),
            )
            .into());
        }
        Ok(())
    }

    /// Moves every queue of every export whose graph contains `node` to
    /// `worker` (a live worker). Queues already there are not listed.
    fn move_node(&self, node: &str, worker: &str) -> Result<Vec<MovedQueue>, ApiError> {
        let mut inner = self.0.lock();
        if !inner.state.graph.contains(node) {
            return Err(GraphError::NotFound {
                field: "node",
                kind: ObjectKind::Node,
                name: node.to_string(),
            }
            .into());
        }
        Self::check_target(&inner, worker)?;
        // `node` and everything above it: an export's graph contains `node`
        // iff its root is one of these.
        let mut above: BTreeSet<&str> = BTreeSet::new();
        let mut stack = vec![node];
        while let Some(name) = stack.pop() {
            if above.insert(name) {
                stack.extend(inner.state.graph.users_of(name));
            }
        }
        let moved: Vec<MovedQueue> = inner
            .state
            .exports
            .values()
            .filter(|r| above.contains(r.export.node.as_str()))
            .flat_map(|r| {
                r.queues
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| w.as_str() != worker)
                    .map(|(i, from)| MovedQueue {
                        export: r.export.id.clone(),
                        queue: i as u32,
                        from: from.clone(),
                        to: worker.to_string(),
                    })
            })
            .collect();
        if moved.is_empty() {
            return Ok(moved);
        }
        let mut next = inner.state.clone();
        for m in &moved {
            if let Some(r) = next.exports.get_mut(&m.export) {
                r.queues[m.queue as usize] = worker.to_string();
            }
        }
        self.0.commit(&mut inner, next)?;
        let mut ids: Vec<&str> = moved.iter().map(|m| m.export.as_str()).collect();
        ids.dedup();
        tracing::info!(%node, to = %worker, queues = moved.len(), exports = ids.len(), "node moved");
        Self::push_plans(&mut inner, &ids);
        Ok(moved)
    }

    /// Moves every queue off `worker` to the least loaded other live workers.
    fn drain(&self, worker: &str) -> Result<Vec<MovedQueue>, ApiError> {
        let mut inner = self.0.lock();
        if !inner.state.workers.contains_key(worker) {
            return Err(ApiError::UnknownWorker {
                field: "worker",
                name: worker.to_string(),
            });
        }
        let on_worker: Vec<(String, usize)> = inner
            .state
            .exports
            .values()
            .flat_map(|r| {
                r.queues
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| w.as_str() == worker)
                    .map(|(i, _)| (r.export.id.clone(), i))
            })
            .collect();
        if on_worker.is_empty() {
            return Ok(Vec::new());
        }
        let counts = inner.state.queue_counts();
        let mut targets: Vec<(usize, String)> = inner
            .live_workers
            .keys()
            .filter(|w| w.as_str() != worker)
            .map(|w| (counts.get(w.as_str()).copied().unwrap_or(0), w.clone()))
            .collect();
        if targets.is_empty() {
            return Err(GraphError::precondition(
                "worker",
                format!(
                    "no other live worker to take the {} queues of worker {worker:?}",
                    on_worker.len()
                ),
            )
            .into());
        }
        let mut next = inner.state.clone();
        let mut moved = Vec::with_capacity(on_worker.len());
        for (id, queue) in on_worker {
            // Least loaded first, counting the queues moved so far; ties by name.
            let Some(target) = targets.iter_mut().min() else {
                break;
            };
            target.0 += 1;
            let to = target.1.clone();
            if let Some(r) = next.exports.get_mut(&id) {
                r.queues[queue] = to.clone();
            }
            moved.push(MovedQueue {
                export: id,
                queue: queue as u32,
                from: worker.to_string(),
                to,
            });
        }
        self.0.commit(&mut inner, next)?;
        let mut ids: Vec<&str> = moved.iter().map(|m| m.export.as_str()).collect();
        ids.dedup();
        tracing::info!(%worker, queues = moved.len(), exports = ids.len(), "worker drained");
        Self::push_plans(&mut inner, &ids);
        Ok(moved)
    }

    /// Sends the current plan of each export in `ids` to the frontends.
    fn push_plans(inner: &mut Inner, ids: &[&str]) {
        let plans: Vec<ExportPlan> = ids
            .iter()
            .filter_map(|id| inner.state.exports.get(*id))
            .filter_map(|r| export_plan(&inner.state, r))
            .collect();
        for plan in plans {
            Shared::broadcast(inner, FrontendEventKind::Upsert(plan));
        }
    }
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    type RegisterStream = EventStream<WorkerEvent>;

    async fn register(
        &self,
        request: Request<WorkerHello>,
    ) -> Result<Response<Self::RegisterStream>, Status> {
        Ok(Response::new(WorkerApi::register(
            self,
            request.into_inner(),
        )?))
    }

    async fn list_workers(
        &self,
        _request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        let inner = self.0.lock();
        let mut queues: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for rec in inner.state.exports.values() {
            for (i, w) in rec.queues.iter().enumerate() {
                queues
                    .entry(w.as_str())
                    .or_default()
                    .push(format!("{}/{i}", rec.export.id));
            }
        }
        let workers = inner
            .state
            .workers
            .iter()
            .map(|(name, rec)| {
                let state = if inner.live_workers.contains_key(name) {
                    WorkerState::Alive
                } else {
                    WorkerState::Gone
                };
                WorkerInfo {
                    name: name.clone(),
                    socket: rec.socket.clone(),
                    pid: rec.pid,
                    state: state as i32,
                    queues: queues.remove(name.as_str()).unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(ListWorkersResponse { workers }))
    }

    async fn move_queue(
        &self,
        request: Request<MoveQueueRequest>,
    ) -> Result<Response<MoveQueueResponse>, Status> {
        let r = request.into_inner();
        let info = WorkerApi::move_queue(self, &r.export, r.queue, &r.worker)?;
        Ok(Response::new(MoveQueueResponse { export: Some(info) }))
    }

    async fn drain_worker(
        &self,
        request: Request<DrainWorkerRequest>,
    ) -> Result<Response<DrainWorkerResponse>, Status> {
        let moved = self.drain(&request.into_inner().worker)?;
        Ok(Response::new(DrainWorkerResponse { moved }))
    }

    async fn move_node(
        &self,
        request: Request<MoveNodeRequest>,
    ) -> Result<Response<MoveNodeResponse>, Status> {
        let r = request.into_inner();
        let moved = WorkerApi::move_node(self, &r.node, &r.worker)?;
        Ok(Response::new(MoveNodeResponse { moved }))
    }
}

// ----- FrontendService -----

/// `blkmesh.v1.FrontendService`.
pub(crate) struct FrontendApi(pub Arc<Shared>);

impl FrontendApi {
    fn register(&self, hello: FrontendHello) -> Result<EventStream<FrontendEvent>, ApiError> {
        validate_name("name", &hello.name)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let session = {
            let mut inner = self.0.lock();
            if inner.shutting_down {
                return Err(ApiError::ShuttingDown);
            }
            if inner
                .frontends
                .get(&hello.name)
                .is_some_and(|c| c.tx.is_some())
            {
                return Err(ApiError::AlreadyRegistered {
                    kind: "frontend",
                    name: hello.name,
                });
            }
            // The snapshot is queued under the lock, so no later change can
            // overtake it or be missed.
            for rec in inner.state.exports.values() {
                if let Some(plan) = export_plan(&inner.state, rec) {
                    let _ = tx.send(Ok(FrontendEvent {
                        event: Some(FrontendEventKind::Upsert(plan)),
                    }));
                }
            }
            let session = inner.next_session;
            inner.next_session += 1;
            inner.frontends.insert(
                hello.name.clone(),
                FrontendConn {
                    session,
                    tx: Some(tx.clone()),
                },
            );
            tracing::info!(frontend = %hello.name, "frontend registered");
            self.0.emit(EventKind::FrontendJoined(hello.name.clone()));
            session
        };
        let shared = self.0.clone();
        let name = hello.name;
        let mut shutdown = self.0.shutdown.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = tx.closed() => {}
                _ = shutdown.wait_for(|v| *v) => {}
            }
            drop(tx);
            shared.frontend_gone(&name, session);
        });
        Ok(Box::pin(UnboundedReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl FrontendService for FrontendApi {
    type RegisterStream = EventStream<FrontendEvent>;

    async fn register(
        &self,
        request: Request<FrontendHello>,
    ) -> Result<Response<Self::RegisterStream>, Status> {
        Ok(Response::new(FrontendApi::register(
            self,
            request.into_inner(),
        )?))
    }
}
