//! A manager client with every service, bounded waits and node-spec
//! builders: the scaffolding the in-process manager tests share.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use blkmesh_manager::RunningManager;
use blkmesh_proto::agent::v1::agent_service_client::AgentServiceClient;
use blkmesh_proto::v1::export_service_client::ExportServiceClient;
use blkmesh_proto::v1::frontend_service_client::FrontendServiceClient;
use blkmesh_proto::v1::node_service_client::NodeServiceClient;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::stats_service_client::StatsServiceClient;
use blkmesh_proto::v1::worker_service_client::WorkerServiceClient;
use blkmesh_proto::v1::zone_service_client::ZoneServiceClient;
use blkmesh_proto::v1::{
    AddExportRequest, ExportInfo, GetNodeRequest, IoUringOptions, NodeInfo, NodeSpec, NullOptions,
    RawOptions, VhostUserBlkExport,
};
use tonic::transport::Channel;

/// How long any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// `f`, or a panic naming `what` after [`WAIT`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// One client per service, over one channel.
#[derive(Clone)]
pub struct Clients {
    pub nodes: NodeServiceClient<Channel>,
    pub exports: ExportServiceClient<Channel>,
    pub workers: WorkerServiceClient<Channel>,
    pub frontends: FrontendServiceClient<Channel>,
    pub stats: StatsServiceClient<Channel>,
    pub zones: ZoneServiceClient<Channel>,
    /// The agents' service (fake workers and frontends).
    pub agents: AgentServiceClient<Channel>,
}

pub async fn connect(m: &RunningManager) -> Clients {
    let ch = within("connect", Channel::from_shared(m.url()).unwrap().connect())
        .await
        .unwrap();
    Clients {
        nodes: NodeServiceClient::new(ch.clone()),
        exports: ExportServiceClient::new(ch.clone()),
        workers: WorkerServiceClient::new(ch.clone()),
        frontends: FrontendServiceClient::new(ch.clone()),
        stats: StatsServiceClient::new(ch.clone()),
        zones: ZoneServiceClient::new(ch.clone()),
        agents: AgentServiceClient::new(ch),
    }
}

pub fn null(name: &str, size: u64) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Null(NullOptions {
            size,
            latency_ns: 0,
        })),
    }
}

pub fn raw(name: &str, child: &str, offset: u64, size: u64) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Raw(RawOptions {
            child: child.into(),
            offset,
            size,
        })),
    }
}

pub fn file(name: &str, path: &Path, read_only: bool) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::IoUring(IoUringOptions {
            path: path.to_str().unwrap().into(),
            direct: false,
            read_only,
        })),
    }
}

pub async fn add_export(
    c: &mut Clients,
    e: VhostUserBlkExport,
) -> Result<ExportInfo, tonic::Status> {
    c.exports
        .add_export(AddExportRequest { export: Some(e) })
        .await
        .map(|r| r.into_inner().export.unwrap())
}

pub async fn get_node(c: &mut Clients, name: &str) -> NodeInfo {
    c.nodes
        .get_node(GetNodeRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
        .node
        .unwrap()
}
