//! A blocking client for the manager's gRPC API.

use std::time::{Duration, Instant};

use blkmesh_proto::client::{ClientConfig, ManagerChannel};
use blkmesh_proto::v1::export_service_client::ExportServiceClient;
use blkmesh_proto::v1::node_service_client::NodeServiceClient;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::worker_service_client::WorkerServiceClient;
use blkmesh_proto::v1::{
    AddExportRequest, AddNodeRequest, ExportInfo, GetNodeRequest, IoUringOptions,
    ListExportsRequest, ListNodesRequest, ListWorkersRequest, NodeInfo, NodeSpec, NullOptions,
    RawOptions, RemoveExportRequest, RemoveNodeRequest, ResizeNodeRequest, UpdateNodeRequest,
    VhostUserBlkExport, WorkerInfo, WorkerState,
};

/// Per-call deadline, so a hung manager fails a test instead of hanging it.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The manager URL is not a valid endpoint.
    #[error("invalid manager url {url:?}")]
    Url {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The private runtime could not be created.
    #[error("cannot start the client runtime")]
    Runtime(#[source] std::io::Error),
    /// The connection options (address, TLS files, token) are not usable.
    #[error("cannot set up the manager connection")]
    Config(#[source] blkmesh_proto::client::ClientError),
    /// The manager answered with an error (or could not be reached).
    #[error("rpc failed: {0}")]
    Rpc(#[from] Box<tonic::Status>),
    /// A bounded wait ran out.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },
}

impl ClientError {
    /// The gRPC code when the manager answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Rpc(status) => Some(status.code()),
            ClientError::Url { .. }
            | ClientError::Runtime(_)
            | ClientError::Config(_)
            | ClientError::Timeout { .. } => None,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::Rpc(Box::new(status))
    }
}

/// Blocking wrapper over the NodeService, ExportService and WorkerService
/// clients, running on its own current-thread runtime. The connection is
/// lazy and re-established after a manager restart.
pub struct BlockingClient {
    rt: tokio::runtime::Runtime,
    channel: ManagerChannel,
    url: String,
}

impl std::fmt::Debug for BlockingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingClient")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl BlockingClient {
    /// A client for the manager at `url` (`http://HOST:PORT`). Does not
    /// connect until the first call.
    pub fn new(url: &str) -> Result<BlockingClient, ClientError> {
        tonic::transport::Endpoint::from_shared(url.to_string()).map_err(|source| {
            ClientError::Url {
                url: url.to_string(),
                source,
            }
        })?;
        Self::with_config(ClientConfig::new(url))
    }

    /// A client for the manager `config` describes (TLS, token). Does not
    /// connect until the first call; unset timeouts get the defaults (5 s
    /// to connect, 10 s per call).
    pub fn with_config(mut config: ClientConfig) -> Result<BlockingClient, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        config.connect_timeout = config.connect_timeout.or(Some(Duration::from_secs(5)));
        config.timeout = config.timeout.or(Some(RPC_TIMEOUT));
        let url = config.url.clone();
        // connect_lazy spawns the channel's worker on the current runtime.
        let channel = rt
            .block_on(async { config.connect_lazy() })
            .map_err(ClientError::Config)?;
        Ok(BlockingClient { rt, channel, url })
    }

    /// The manager URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn nodes(&self) -> NodeServiceClient<ManagerChannel> {
        NodeServiceClient::new(self.channel.clone())
    }

    fn exports(&self) -> ExportServiceClient<ManagerChannel> {
        ExportServiceClient::new(self.channel.clone())
    }

    fn workers(&self) -> WorkerServiceClient<ManagerChannel> {
        WorkerServiceClient::new(self.channel.clone())
    }

    /// Adds any node.
    pub fn add_node(&self, spec: NodeSpec) -> Result<NodeInfo, ClientError> {
        let mut client = self.nodes();
        let resp = self.rt.block_on(client.add_node(AddNodeRequest {
            node: Some(spec),
            ..Default::default()
        }))?;
        Ok(resp.into_inner().node.unwrap_or_default())
    }

    /// Adds an `io_uring` protocol node over the file or device at `path`.
    pub fn add_io_uring(
        &self,
        name: &str,
        path: &std::path::Path,
        direct: bool,
        read_only: bool,
    ) -> Result<NodeInfo, ClientError> {
        self.add_node(NodeSpec {
            name: name.to_string(),
            driver: Some(Driver::IoUring(IoUringOptions {
                path: path.display().to_string(),
                direct,
                read_only,
            })),
        })
    }

    /// Adds a `null` protocol node of `size` bytes.
    pub fn add_null(&self, name: &str, size: u64) -> Result<NodeInfo, ClientError> {
        self.add_node(NodeSpec {
            name: name.to_string(),
            driver: Some(Driver::Null(NullOptions {
                size,
                latency_ns: 0,
            })),
        })
    }

    /// Adds a `raw` format node: the window `offset..offset+size` of `child`
    /// (`size` 0: up to the end of the child).
    pub fn add_raw(
        &self,
        name: &str,
        child: &str,
        offset: u64,
        size: u64,
    ) -> Result<NodeInfo, ClientError> {
        self.add_node(NodeSpec {
            name: name.to_string(),
            driver: Some(Driver::Raw(RawOptions {
                child: child.to_string(),
                offset,
                size,
            })),
        })
    }

    /// Removes a node.
    pub fn remove_node(&self, name: &str) -> Result<(), ClientError> {
        let mut client = self.nodes();
        self.rt.block_on(client.remove_node(RemoveNodeRequest {
            name: name.to_string(),
        }))?;
        Ok(())
    }

    /// Replaces a node's options, live (UpdateNode).
    pub fn update_node(&self, spec: NodeSpec) -> Result<NodeInfo, ClientError> {
        let mut client = self.nodes();
        let resp = self
            .rt
            .block_on(client.update_node(UpdateNodeRequest { node: Some(spec) }))?;
        Ok(resp.into_inner().node.unwrap_or_default())
    }

    /// Grows a node to `size` bytes (ResizeNode).
    pub fn resize_node(&self, name: &str, size: u64) -> Result<NodeInfo, ClientError> {
        let mut client = self.nodes();
        let resp = self.rt.block_on(client.resize_node(ResizeNodeRequest {
            name: name.to_string(),
            size,
        }))?;
        Ok(resp.into_inner().node.unwrap_or_default())
    }

    /// One node.
    pub fn get_node(&self, name: &str) -> Result<NodeInfo, ClientError> {
        let mut client = self.nodes();
        let resp = self.rt.block_on(client.get_node(GetNodeRequest {
            name: name.to_string(),
        }))?;
        Ok(resp.into_inner().node.unwrap_or_default())
    }

    /// Lists the nodes.
    pub fn list_nodes(&self) -> Result<Vec<NodeInfo>, ClientError> {
        let mut client = self.nodes();
        let resp = self.rt.block_on(client.list_nodes(ListNodesRequest {}))?;
        Ok(resp.into_inner().nodes)
    }

    /// Adds an export as given (no waiting for its socket).
    pub fn add_export(&self, export: VhostUserBlkExport) -> Result<ExportInfo, ClientError> {
        let mut client = self.exports();
        let resp = self.rt.block_on(client.add_export(AddExportRequest {
            export: Some(export),
        }))?;
        Ok(resp.into_inner().export.unwrap_or_default())
    }

    /// Removes an export.
    pub fn remove_export(&self, id: &str) -> Result<(), ClientError> {
        let mut client = self.exports();
        self.rt
            .block_on(client.remove_export(RemoveExportRequest { id: id.to_string() }))?;
        Ok(())
    }

    /// Lists the exports.
    pub fn list_exports(&self) -> Result<Vec<ExportInfo>, ClientError> {
        let mut client = self.exports();
        let resp = self
            .rt
            .block_on(client.list_exports(ListExportsRequest {}))?;
        Ok(resp.into_inner().exports)
    }

    /// Lists the workers the manager knows.
    pub fn list_workers(&self) -> Result<Vec<WorkerInfo>, ClientError> {
        let mut client = self.workers();
        let resp = self
            .rt
            .block_on(client.list_workers(ListWorkersRequest {}))?;
        Ok(resp.into_inner().workers)
    }

    /// Polls ListWorkers (every 50 ms, RPC errors count as "not yet") until
    /// every worker in `names` is in `state`.
    pub fn wait_workers(
        &self,
        names: &[&str],
        state: WorkerState,
        timeout: Duration,
    ) -> Result<Vec<WorkerInfo>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.list_workers() {
                Ok(workers) => {
                    let done = names.iter().all(|n| {
                        workers
                            .iter()
                            .any(|w| w.name == *n && w.state == state as i32)
                    });
                    if done {
                        return Ok(workers);
                    }
                    format!("{:?}", summarize(&workers))
                }
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout {
                    what: format!("workers {names:?} to be {state:?} (last: {last})"),
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `(name, state)` pairs for messages.
fn summarize(workers: &[WorkerInfo]) -> Vec<(String, WorkerState)> {
    workers
        .iter()
        .map(|w| {
            (
                w.name.clone(),
                WorkerState::try_from(w.state).unwrap_or(WorkerState::Unspecified),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_invalid_url() {
        let err = BlockingClient::new("not a url\n").unwrap_err();
        assert!(matches!(err, ClientError::Url { .. }), "{err}");
    }

    #[test]
    fn unreachable_manager_is_an_rpc_error() {
        // Port 1 on localhost: nothing listens there.
        let client = BlockingClient::new("http://127.0.0.1:1").unwrap();
        let err = client.list_workers().unwrap_err();
        assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err}");
    }

    #[test]
    fn wait_workers_times_out_with_reason() {
        let client = BlockingClient::new("http://127.0.0.1:1").unwrap();
        let err = client
            .wait_workers(&["worker0"], WorkerState::Alive, Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    }
}
