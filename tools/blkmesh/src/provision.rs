//! Talking to the manager: waiting for the workers, creating the default
//! node and export when the persisted state lacks them, or waiting for the
//! exports of a configuration file (which the manager applies itself).

use std::path::Path;
use std::time::{Duration, Instant};

use blkmesh_graph::kinds::kind_of;
use blkmesh_proto::client::{ClientConfig, ManagerChannel as Channel};
use blkmesh_proto::v1::export_service_client::ExportServiceClient;
use blkmesh_proto::v1::node_service_client::NodeServiceClient;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::worker_service_client::WorkerServiceClient;
use blkmesh_proto::v1::{
    AddExportRequest, AddNodeRequest, ExportInfo, IoUringOptions, ListExportsRequest,
    ListNodesRequest, ListWorkersRequest, NodeSpec, NullOptions, VhostUserBlkExport, WorkerState,
};

use crate::error::Error;
use crate::process::ProcessSet;

/// Name of the default node and export.
pub const DISK: &str = "disk0";

/// A lazily connecting channel to the manager (`config.url`, with its TLS
/// and token options).
pub fn channel(config: ClientConfig) -> Result<Channel, Error> {
    let addr = config.url.clone();
    config
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(10))
        .connect_lazy()
        .map_err(|source| Error::Endpoint { addr, source })
}

/// Polls ListWorkers until every worker in `names` is ALIVE, failing early
/// when a supervised process exits.
pub async fn wait_workers_alive(
    channel: &Channel,
    names: &[String],
    procs: &mut ProcessSet,
    timeout: Duration,
) -> Result<(), Error> {
    let mut client = WorkerServiceClient::new(channel.clone());
    let deadline = Instant::now() + timeout;
    loop {
        procs.startup_check()?;
        let last = match client.list_workers(ListWorkersRequest {}).await {
            Ok(resp) => {
                let workers = resp.into_inner().workers;
                let missing: Vec<&str> = names
                    .iter()
                    .filter(|n| {
                        !workers
                            .iter()
                            .any(|w| &w.name == *n && w.state == WorkerState::Alive as i32)
                    })
                    .map(String::as_str)
                    .collect();
                if missing.is_empty() {
                    return Ok(());
                }
                format!("not alive yet: {}", missing.join(", "))
            }
            Err(status) => format!("manager: {}", status.message()),
        };
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("the workers to register ({last})"),
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the default disk wants.
#[derive(Debug)]
pub struct DiskWish<'a> {
    pub image: &'a Path,
    /// Export a null device of this size instead of the image.
    pub null_size: Option<u64>,
    /// Spread the export's queues over the workers.
    pub spread: bool,
    pub socket: &'a Path,
    pub queues: u32,
}

/// The export to print, and remarks about state kept from an earlier run.
#[derive(Debug)]
pub struct Provisioned {
    pub export: ExportInfo,
    pub notes: Vec<String>,
}

/// Adds node `disk0` (io_uring over the image) and export `disk0` unless
/// they exist already; existing ones are kept as they are.
pub async fn ensure_disk(channel: &Channel, wish: &DiskWish<'_>) -> Result<Provisioned, Error> {
    let mut nodes = NodeServiceClient::new(channel.clone());
    let mut exports = ExportServiceClient::new(channel.clone());
    let mut notes = Vec::new();

    let existing_nodes = nodes
        .list_nodes(ListNodesRequest {})
        .await
        .map_err(Error::rpc("listing nodes"))?
        .into_inner()
        .nodes;
    let image = wish.image.display().to_string();
    match existing_nodes
        .iter()
        .find_map(|n| n.spec.as_ref().filter(|s| s.name == DISK))
    {
        Some(spec) => {
            let same = match (&spec.driver, wish.null_size) {
                (Some(Driver::Null(o)), Some(size)) => o.size == size,
                (Some(Driver::IoUring(o)), None) => o.path == image,
                _ => false,
            };
            if !same {
                notes.push(format!(
                    "node {DISK} exists from an earlier run with other options ({}); kept as is",
                    describe_driver(spec.driver.as_ref())
                ));
            }
        }
        None => {
            nodes
                .add_node(AddNodeRequest {
                    node: Some(NodeSpec {
                        name: DISK.to_string(),
                        driver: Some(match wish.null_size {
                            Some(size) => Driver::Null(NullOptions {
                                size,
                                latency_ns: 0,
                            }),
                            None => Driver::IoUring(IoUringOptions {
                                path: image,
                                direct: false,
                                read_only: false,
                            }),
                        }),
                    }),
                    ..Default::default()
                })
                .await
                .map_err(Error::rpc("adding node disk0"))?;
            tracing::info!(node = DISK, "node added");
        }
    }

    let existing = exports
        .list_exports(ListExportsRequest {})
        .await
        .map_err(Error::rpc("listing exports"))?
        .into_inner()
        .exports
        .into_iter()
        .find(|e| e.export.as_ref().is_some_and(|x| x.id == DISK));
    let export = match existing {
        Some(info) => {
            let e = info.export.clone().unwrap_or_default();
            let socket = wish.socket.display().to_string();
            if e.socket != socket || e.num_queues.max(1) != wish.queues || !e.writable {
                notes.push(format!(
                    "export {DISK} exists from an earlier run (socket {}, {} queue(s), {}); kept as is",
                    e.socket,
                    e.num_queues.max(1),
                    if e.writable { "writable" } else { "read-only" }
                ));
            }
            info
        }
        None => {
            let resp = exports
                .add_export(AddExportRequest {
                    export: Some(VhostUserBlkExport {
                        id: DISK.to_string(),
                        node: DISK.to_string(),
                        socket: wish.socket.display().to_string(),
                        num_queues: wish.queues,
                        queue_size: 0,
                        logical_block_size: 0,
                        writable: true,
                        serial: String::new(),
                        spread_queues: wish.spread,
                    }),
                })
                .await
                .map_err(Error::rpc("adding export disk0"))?;
            tracing::info!(export = DISK, "export added");
            resp.into_inner().export.unwrap_or_default()
        }
    };
    Ok(Provisioned { export, notes })
}

/// The exports of a configuration file as the manager lists them, and the
/// other exports it has.
#[derive(Debug)]
pub struct ConfigExports {
    /// In the order of the file.
    pub exports: Vec<ExportInfo>,
    /// Ids of the exports the file does not name (kept by the manager).
    pub others: Vec<String>,
}

/// Polls ListExports until every export id in `ids` is placed on a worker
/// (the manager adds the exports of its configuration file when the first
/// worker registers).
pub async fn wait_config_exports(
    channel: &Channel,
    ids: &[String],
    procs: &mut ProcessSet,
    timeout: Duration,
) -> Result<ConfigExports, Error> {
    let mut client = ExportServiceClient::new(channel.clone());
    let deadline = Instant::now() + timeout;
    loop {
        procs.startup_check()?;
        let last = match client.list_exports(ListExportsRequest {}).await {
            Ok(resp) => {
                let listed = resp.into_inner().exports;
                let found: Vec<Option<&ExportInfo>> = ids
                    .iter()
                    .map(|id| {
                        listed.iter().find(|e| {
                            !e.queues.is_empty() && e.export.as_ref().is_some_and(|x| &x.id == id)
                        })
                    })
                    .collect();
                if found.iter().all(Option::is_some) {
                    let others = listed
                        .iter()
                        .filter_map(|e| e.export.as_ref())
                        .filter(|x| !ids.contains(&x.id))
                        .map(|x| x.id.clone())
                        .collect();
                    return Ok(ConfigExports {
                        exports: found.into_iter().flatten().cloned().collect(),
                        others,
                    });
                }
                let missing: Vec<&str> = ids
                    .iter()
                    .zip(&found)
                    .filter(|(_, f)| f.is_none())
                    .map(|(id, _)| id.as_str())
                    .collect();
                format!("not placed yet: {}", missing.join(", "))
            }
            Err(status) => format!("manager: {}", status.message()),
        };
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("the exports of the configuration file ({last})"),
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn describe_driver(driver: Option<&Driver>) -> String {
    driver.map_or_else(|| "no driver".to_string(), |d| kind_of(d).summary())
}
