//! `blkmeshctl`: command-line client for the blkmesh management API.
//!
//! ```text
//! blkmeshctl [--addr http://127.0.0.1:50051] [--json] <noun> <verb> ...
//! ```
//!
//! Exit status: 0 on success, 1 when the manager refuses the request or
//! cannot be reached (`error: <CODE>: <message>` on stderr), 2 for usage
//! errors.

mod rule;
mod size;
mod stats;
mod view;

use std::process::ExitCode;
use std::time::Duration;

use blkmesh_proto::v1::export_service_client::ExportServiceClient;
use blkmesh_proto::v1::node_service_client::NodeServiceClient;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::stats_service_client::StatsServiceClient;
use blkmesh_proto::v1::worker_service_client::WorkerServiceClient;
use blkmesh_proto::v1::{
    AddExportRequest, AddNodeRequest, Bucket, DrainWorkerRequest, FaultInjectionOptions, FaultRule,
    GetNodeRequest, GetStatsRequest, IoUringOptions, ListExportsRequest, ListNodesRequest,
    ListWorkersRequest, MoveNodeRequest, MoveQueueRequest, NodeSpec, NullOptions,
    NvmeIoUringOptions, RawOptions, RemoveExportRequest, RemoveNodeRequest, ThrottleLimits,
    ThrottleOptions, VhostUserBlkExport, VirtioBlkVhostUserOptions, VirtioBlkVhostVdpaOptions,
    WatchEventsRequest,
};
use clap::{Args, Parser, Subcommand};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::rule::parse_rule;
use crate::size::parse_size;
use crate::view::Output;

/// Manage a blkmesh-manager: nodes, exports and workers; statistics and events.
#[derive(Debug, Parser)]
#[command(name = "blkmeshctl", version)]
struct Cli {
    /// Manager address: http://HOST:PORT or unix:/PATH.
    #[arg(
        long,
        global = true,
        env = "BLKMESH_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    addr: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Block nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// vhost-user-blk exports.
    #[command(subcommand)]
    Export(ExportCmd),
    /// Backend workers.
    #[command(subcommand)]
    Worker(WorkerCmd),
    /// I/O statistics per export, queue and node (counters since each
    /// frontend or worker started; latency percentiles estimated from
    /// power-of-two histograms, shown as the bucket's bound).
    Stats {
        /// Only this export (repeat for more). Given alone, no nodes are shown.
        #[arg(long = "export", value_name = "E")]
        exports: Vec<String>,
        /// Only this node (repeat for more). Given alone, no exports are shown.
        #[arg(long = "node", value_name = "N")]
        nodes: Vec<String>,
    },
    /// Print events as they happen (one line each) until interrupted.
    Events {
        /// Stop after N events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// gRPC health check; exits 0 if the manager is SERVING.
    Health {
        /// Service to check ("" = the whole server).
        #[arg(long, default_value = "")]
        service: String,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// Add a file or block device (libblkio io_uring driver).
    AddIoUring {
        name: String,
        /// Absolute path of a regular file or block device.
        #[arg(long)]
        path: String,
        /// Open with O_DIRECT.
        #[arg(long)]
        direct: bool,
        /// Open read-only.
        #[arg(long)]
        read_only: bool,
    },
    /// Add a null node (no storage).
    AddNull {
        name: String,
        /// Size, e.g. 1G (a multiple of 512).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Added latency per request, in microseconds.
        #[arg(long, default_value_t = 0)]
        latency_us: u64,
    },
    /// Add a raw window over a child node.
    AddRaw {
        name: String,
        /// Child node.
        #[arg(long)]
        child: String,
        /// Start of the window in the child.
        #[arg(long, value_parser = parse_size, default_value = "0")]
        offset: u64,
        /// Size of the window (0 = to the end of the child).
        #[arg(long, value_parser = parse_size, default_value = "0")]
        size: u64,
    },
    /// Add an NVMe namespace's generic char device (libblkio nvme-io_uring driver).
    AddNvmeIoUring {
        name: String,
        /// Absolute path of the char device, e.g. /dev/ng0n1.
        #[arg(long)]
        path: String,
        /// Open read-only.
        #[arg(long)]
        read_only: bool,
    },
    /// Add another vhost-user-blk target, e.g. qemu-storage-daemon
    /// (libblkio virtio-blk-vhost-user driver).
    AddVhostUser {
        name: String,
        /// Absolute path of the target's listening unix socket.
        #[arg(long)]
        path: String,
        /// Open read-only.
        #[arg(long)]
        read_only: bool,
    },
    /// Add a vDPA block device (libblkio virtio-blk-vhost-vdpa driver).
    AddVdpa {
        name: String,
        /// Absolute path of the char device, e.g. /dev/vhost-vdpa-0.
        #[arg(long)]
        path: String,
        /// Open read-only.
        #[arg(long)]
        read_only: bool,
    },
    /// Add a throttle filter (I/O rate limits) over a child node.
    ///
    /// Each limit is a token bucket: RATE per second on average, up to BURST
    /// at once (burst 0 or unset = the rate). Unset rates are unlimited; at
    /// least one must be set. Byte values accept k/M/G/T suffixes.
    AddThrottle {
        name: String,
        /// Child node.
        #[arg(long)]
        child: String,
        /// Throttle group: nodes of one group share their buckets and must
        /// all carry the same limits.
        #[arg(long, default_value = "", hide_default_value = true)]
        group: String,
        #[command(flatten)]
        limits: ThrottleArgs,
    },
    /// Add a fault-injection filter over a child node (for tests).
    ///
    /// RULE is `key=value,...`. Rules are tried in order; the first that
    /// fires decides. Keys:
    ///   ops=OPS        read, write, flush, discard, write-zeroes joined by +,
    ///                  or all (the default)
    ///   start=BYTES    requests must overlap [start, end) (k/M/G/T suffixes;
    ///   end=BYTES      end 0 or unset = to the end of the device)
    ///   skip=N         let N matching requests through first
    ///   count=N        fire N times (0 or unset = forever)
    ///   prob=P         chance in [0, 1] to fire (0 or unset = always)
    /// and exactly one action:
    ///   errno=E        fail with errno E: a number in 1..=4095 or a name
    ///                  (EIO, ENOSPC, EROFS, EINVAL, ENOMEM, ETIMEDOUT, EAGAIN,
    ///                  ENOTSUP/EOPNOTSUPP, ENODATA, EBADMSG, ...)
    ///   delay=D        hold the request D (ns, us, ms or s; at most 10s)
    /// Examples:
    ///   --rule ops=read+write,start=0,end=1M,skip=2,count=1,prob=0.5,errno=EIO
    ///   --rule delay=10ms
    #[command(verbatim_doc_comment)]
    AddFaultInjection {
        name: String,
        /// Child node.
        #[arg(long)]
        child: String,
        /// A fault rule; repeat for more (at most 64).
        #[arg(long = "rule", value_name = "RULE", required = true, value_parser = parse_rule)]
        rules: Vec<FaultRule>,
    },
    /// Remove a node no other node or export uses.
    Remove { name: String },
    /// List nodes.
    List,
    /// Show one node.
    Info { name: String },
    /// Move every queue of every export whose graph contains a node to one
    /// (live) worker, without failing any request.
    Move {
        /// The node.
        node: String,
        /// Destination worker.
        worker: String,
    },
}

/// The limits of `node add-throttle`.
#[derive(Debug, Args)]
struct ThrottleArgs {
    /// Total I/O operations per second.
    #[arg(long, value_name = "N")]
    iops: Option<u64>,
    /// Read operations per second.
    #[arg(long, value_name = "N")]
    iops_read: Option<u64>,
    /// Write operations per second.
    #[arg(long, value_name = "N")]
    iops_write: Option<u64>,
    /// Total bytes per second, e.g. 100M.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    bps: Option<u64>,
    /// Bytes read per second.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    bps_read: Option<u64>,
    /// Bytes written per second.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    bps_write: Option<u64>,
    /// Burst of --iops (at least the rate).
    #[arg(long, value_name = "N")]
    iops_burst: Option<u64>,
    /// Burst of --iops-read.
    #[arg(long, value_name = "N")]
    iops_read_burst: Option<u64>,
    /// Burst of --iops-write.
    #[arg(long, value_name = "N")]
    iops_write_burst: Option<u64>,
    /// Burst of --bps (at least the rate and 4k).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    bps_burst: Option<u64>,
    /// Burst of --bps-read.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    bps_read_burst: Option<u64>,
    /// Burst of --bps-write.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    bps_write_burst: Option<u64>,
}

impl ThrottleArgs {
    fn limits(&self) -> ThrottleLimits {
        // A bucket is sent when its rate or burst is given; the manager
        // explains what is wrong with a burst without a rate.
        let b = |rate: Option<u64>, burst: Option<u64>| {
            (rate.is_some() || burst.is_some()).then(|| Bucket {
                rate: rate.unwrap_or(0),
                burst: burst.unwrap_or(0),
            })
        };
        ThrottleLimits {
            iops_total: b(self.iops, self.iops_burst),
            iops_read: b(self.iops_read, self.iops_read_burst),
            iops_write: b(self.iops_write, self.iops_write_burst),
            bps_total: b(self.bps, self.bps_burst),
            bps_read: b(self.bps_read, self.bps_read_burst),
            bps_write: b(self.bps_write, self.bps_write_burst),
        }
    }
}

#[derive(Debug, Subcommand)]
enum ExportCmd {
    /// Add a vhost-user-blk export.
    Add {
        id: String,
        /// Root node of the export.
        #[arg(long)]
        node: String,
        /// Absolute path of the vhost-user socket.
        #[arg(long)]
        socket: String,
        /// Number of virtqueues (default 1).
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        num_queues: u32,
        /// Virtqueue size (default 256).
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        queue_size: u32,
        /// Logical block size: 512 or 4096.
        #[arg(long, default_value_t = 512)]
        block_size: u32,
        /// Accept writes.
        #[arg(long)]
        writable: bool,
        /// GET_ID serial (default: the export id).
        #[arg(long, default_value = "")]
        serial: String,
        /// Spread the queues over the live workers (round robin) instead of
        /// placing them all on one. Refused over a throttle without a group.
        #[arg(long)]
        spread: bool,
    },
    /// Remove an export.
    Remove { id: String },
    /// List exports.
    List,
}

#[derive(Debug, Subcommand)]
enum WorkerCmd {
    /// List workers.
    List,
    /// Move one queue of an export to another (live) worker, without
    /// failing any request.
    MoveQueue {
        /// Export id.
        export: String,
        /// Queue index (0-based).
        queue: u32,
        /// Destination worker.
        worker: String,
    },
    /// Move every queue off a worker to the least loaded other live
    /// workers (for maintenance).
    Drain {
        /// The worker to empty.
        worker: String,
    },
}

/// A failed command, printed as `error: CODE: message`.
struct Failure {
    code: &'static str,
    message: String,
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Failure {
            code: code_name(s.code()),
            message: s.message().to_string(),
        }
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}: {}", f.code, f.message);
            ExitCode::FAILURE
        }
    }
}

/// Connects to the manager; `streaming` calls get no overall deadline.
async fn connect(addr: &str, streaming: bool) -> Result<Channel, Failure> {
    let unavailable = |e: &dyn std::fmt::Display| Failure {
        code: "UNAVAILABLE",
        message: format!("cannot connect to {addr}: {e}"),
    };
    let invalid = |e: &dyn std::fmt::Display| Failure {
        code: "INVALID_ARGUMENT",
        message: format!("--addr {addr:?}: {e}"),
    };
    if let Some(path) = addr.strip_prefix("unix:") {
        // unix:/path or unix:///path
        let path = std::path::PathBuf::from(format!("/{}", path.trim_start_matches('/')));
        let endpoint = deadline(
            Endpoint::from_static("http://localhost").connect_timeout(Duration::from_secs(5)),
            streaming,
        );
        endpoint
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .map_err(|e| unavailable(&error_chain(&e)))
    } else {
        let endpoint = deadline(
            Endpoint::from_shared(addr.to_string())
                .map_err(|e| invalid(&e))?
                .connect_timeout(Duration::from_secs(5)),
            streaming,
        );
        endpoint
            .connect()
            .await
            .map_err(|e| unavailable(&error_chain(&e)))
    }
}

/// A 30 s deadline per call, except for streams that run until stopped.
fn deadline(endpoint: Endpoint, streaming: bool) -> Endpoint {
    if streaming {
        endpoint
    } else {
        endpoint.timeout(Duration::from_secs(30))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let out = Output { json: cli.json };
    let streaming = matches!(cli.command, Command::Events { .. });
    let channel = connect(&cli.addr, streaming).await?;
    match cli.command {
        Command::Node(cmd) => node(cmd, channel, out).await,
        Command::Export(cmd) => export(cmd, channel, out).await,
        Command::Worker(cmd) => worker(cmd, channel, out).await,
        Command::Stats { exports, nodes } => {
            // Given only one kind of filter, show only that kind.
            let show_exports = !exports.is_empty() || nodes.is_empty();
            let show_nodes = !nodes.is_empty() || exports.is_empty();
            let resp = StatsServiceClient::new(channel)
                .get_stats(GetStatsRequest { exports, nodes })
                .await?
                .into_inner();
            stats::print_stats(&resp, out.json, show_exports, show_nodes);
            Ok(())
        }
        Command::Events { count } => events(channel, out, count).await,
        Command::Health { service } => {
            use tonic_health::pb::health_check_response::ServingStatus;
            use tonic_health::pb::health_client::HealthClient;
            use tonic_health::pb::HealthCheckRequest;
            let resp = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: service.clone(),
                })
                .await?
                .into_inner();
            let status = ServingStatus::try_from(resp.status).unwrap_or(ServingStatus::Unknown);
            out.health(&service, status.as_str_name());
            if status == ServingStatus::Serving {
                Ok(())
            } else {
                Err(Failure {
                    code: "UNAVAILABLE",
                    message: format!("service {service:?} is {}", status.as_str_name()),
                })
            }
        }
    }
}

async fn events(channel: Channel, out: Output, count: Option<u64>) -> Result<(), Failure> {
    use std::io::Write;
    let mut stream = StatsServiceClient::new(channel)
        .watch_events(WatchEventsRequest {})
        .await?
        .into_inner();
    let mut seen: u64 = 0;
    let mut stdout = std::io::stdout();
    while count.is_none_or(|n| seen < n) {
        let Some(event) = stream.message().await? else {
            return Err(Failure {
                code: "UNAVAILABLE",
                message: "the manager ended the event stream".into(),
            });
        };
        seen += 1;
        let line = stats::event_line(&event, out.json);
        if writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            // stdout closed (e.g. piped into `head`): done.
            return Ok(());
        }
    }
    Ok(())
}

async fn node(cmd: NodeCmd, channel: Channel, out: Output) -> Result<(), Failure> {
    let mut client = NodeServiceClient::new(channel.clone());
    let spec = match cmd {
        NodeCmd::AddIoUring {
            name,
            path,
            direct,
            read_only,
        } => NodeSpec {
            name,
            driver: Some(Driver::IoUring(IoUringOptions {
                path,
                direct,
                read_only,
            })),
        },
        NodeCmd::AddNull {
            name,
            size,
            latency_us,
        } => NodeSpec {
            name,
            driver: Some(Driver::Null(NullOptions {
                size,
                latency_ns: latency_us.checked_mul(1000).ok_or_else(|| Failure {
                    code: "INVALID_ARGUMENT",
                    message: format!("--latency-us {latency_us} is too large"),
                })?,
            })),
        },
        NodeCmd::AddRaw {
            name,
            child,
            offset,
            size,
        } => NodeSpec {
            name,
            driver: Some(Driver::Raw(RawOptions {
                child,
                offset,
                size,
            })),
        },
        NodeCmd::AddNvmeIoUring {
            name,
            path,
            read_only,
        } => NodeSpec {
            name,
            driver: Some(Driver::NvmeIoUring(NvmeIoUringOptions { path, read_only })),
        },
        NodeCmd::AddVhostUser {
            name,
            path,
            read_only,
        } => NodeSpec {
            name,
            driver: Some(Driver::VirtioBlkVhostUser(VirtioBlkVhostUserOptions {
                path,
                read_only,
            })),
        },
        NodeCmd::AddVdpa {
            name,
            path,
            read_only,
        } => NodeSpec {
            name,
            driver: Some(Driver::VirtioBlkVhostVdpa(VirtioBlkVhostVdpaOptions {
                path,
                read_only,
            })),
        },
        NodeCmd::AddThrottle {
            name,
            child,
            group,
            limits,
        } => NodeSpec {
            name,
            driver: Some(Driver::Throttle(ThrottleOptions {
                child,
                limits: Some(limits.limits()),
                group,
            })),
        },
        NodeCmd::AddFaultInjection { name, child, rules } => NodeSpec {
            name,
            driver: Some(Driver::FaultInjection(FaultInjectionOptions {
                child,
                rules,
            })),
        },
        NodeCmd::Remove { name } => {
            client
                .remove_node(RemoveNodeRequest { name: name.clone() })
                .await?;
            out.removed("node", &name);
            return Ok(());
        }
        NodeCmd::List => {
            let nodes = client
                .list_nodes(ListNodesRequest {})
                .await?
                .into_inner()
                .nodes;
            out.nodes(&nodes);
            return Ok(());
        }
        NodeCmd::Info { name } => {
            let node = client
                .get_node(GetNodeRequest { name })
                .await?
                .into_inner()
                .node
                .unwrap_or_default();
            out.node(&node);
            return Ok(());
        }
        NodeCmd::Move { node, worker } => {
            let moved = WorkerServiceClient::new(channel)
                .move_node(MoveNodeRequest {
                    node: node.clone(),
                    worker: worker.clone(),
                })
                .await?
                .into_inner()
                .moved;
            out.moved(
                &moved,
                &format!(
                    "no queue to move: no export over node {node} has one off worker {worker}"
                ),
            );
            return Ok(());
        }
    };
    let node = client
        .add_node(AddNodeRequest { node: Some(spec) })
        .await?
        .into_inner()
        .node
        .unwrap_or_default();
    out.node(&node);
    Ok(())
}

async fn export(cmd: ExportCmd, channel: Channel, out: Output) -> Result<(), Failure> {
    let mut client = ExportServiceClient::new(channel);
    match cmd {
        ExportCmd::Add {
            id,
            node,
            socket,
            num_queues,
            queue_size,
            block_size,
            writable,
            serial,
            spread,
        } => {
            let export = VhostUserBlkExport {
                id,
                node,
                socket,
                num_queues,
                queue_size,
                logical_block_size: block_size,
                writable,
                serial,
                spread_queues: spread,
            };
            let info = client
                .add_export(AddExportRequest {
                    export: Some(export),
                })
                .await?
                .into_inner()
                .export
                .unwrap_or_default();
            out.export(&info);
        }
        ExportCmd::Remove { id } => {
            client
                .remove_export(RemoveExportRequest { id: id.clone() })
                .await?;
            out.removed("export", &id);
        }
        ExportCmd::List => {
            let exports = client
                .list_exports(ListExportsRequest {})
                .await?
                .into_inner()
                .exports;
            out.exports(&exports);
        }
    }
    Ok(())
}

async fn worker(cmd: WorkerCmd, channel: Channel, out: Output) -> Result<(), Failure> {
    let mut client = WorkerServiceClient::new(channel);
    match cmd {
        WorkerCmd::List => {
            let workers = client
                .list_workers(ListWorkersRequest {})
                .await?
                .into_inner()
                .workers;
            out.workers(&workers);
        }
        WorkerCmd::MoveQueue {
            export,
            queue,
            worker,
        } => {
            let info = client
                .move_queue(MoveQueueRequest {
                    export,
                    queue,
                    worker,
                })
                .await?
                .into_inner()
                .export
                .unwrap_or_default();
            out.export(&info);
        }
        WorkerCmd::Drain { worker } => {
            let moved = client
                .drain_worker(DrainWorkerRequest {
                    worker: worker.clone(),
                })
                .await?
                .into_inner()
                .moved;
            out.moved(
                &moved,
                &format!("worker {worker} has no queues; nothing moved"),
            );
        }
    }
    Ok(())
}
