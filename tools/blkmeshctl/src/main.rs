//! `blkmeshctl`: command-line client for the blkmesh management API.
//!
//! ```text
//! blkmeshctl [--addr http://127.0.0.1:50051] [--json] <noun> <verb> ...
//! ```
//!
//! A manager serving TLS is reached at `https://HOST:PORT` with `--ca FILE`
//! (the CA that signed its certificate), plus `--cert`/`--key` when it asks
//! for a client certificate; `--token-file FILE` sends its bearer token.
//!
//! Exit status: 0 on success, 1 when the manager refuses the request or
//! cannot be reached (`error: <CODE>: <message>` on stderr), 2 for usage
//! errors and for a configuration file `config check` refuses.

#![forbid(unsafe_code)]

mod stats;
mod view;

// Sizes and fault rules are written as the manager's configuration file
// writes them.
pub(crate) use blkmesh_manager::{rule, size};

use std::process::ExitCode;
use std::time::Duration;

use blkmesh_proto::client::{ClientConfig, ClientError, ManagerChannel};
use blkmesh_proto::v1::export_service_client::ExportServiceClient;
use blkmesh_proto::v1::frontend_service_client::FrontendServiceClient;
use blkmesh_proto::v1::node_service_client::NodeServiceClient;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::stats_service_client::StatsServiceClient;
use blkmesh_proto::v1::worker_service_client::WorkerServiceClient;
use blkmesh_proto::v1::zone_service_client::ZoneServiceClient;
use blkmesh_proto::v1::{
    AddExportRequest, AddNodeRequest, Bucket, DrainWorkerRequest, FaultInjectionOptions, FaultRule,
    GetNodeRequest, GetStatsRequest, IoUringOptions, ListExportsRequest, ListFrontendsRequest,
    ListNodesRequest, ListWorkersRequest, ManageZoneRequest, MoveNodeRequest, MoveQueueRequest,
    NodeInfo, NodeSpec, NullOptions, NvmeIoUringOptions, RawOptions, RemoveExportRequest,
    RemoveNodeRequest, ReportZonesRequest, ResizeNodeRequest, ThrottleLimits, ThrottleOptions,
    UpdateNodeRequest, VhostUserBlkExport, VirtioBlkVhostUserOptions, VirtioBlkVhostVdpaOptions,
    WatchEventsRequest, ZoneAction, ZonedOptions,
};
use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::rule::{parse_duration_ns, parse_rule};
use crate::size::{parse_size, parse_size_u32};
use crate::view::Output;

/// Manage a blkmesh-manager: nodes, exports and workers; statistics and events.
#[derive(Debug, Parser)]
#[command(name = "blkmeshctl", version)]
struct Cli {
    /// Manager address: http://HOST:PORT, https://HOST:PORT (TLS; needs
    /// --ca) or unix:/PATH.
    #[arg(
        long,
        global = true,
        env = "BLKMESH_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    addr: String,
    /// CA certificate (PEM) that signed the manager's TLS certificate.
    #[arg(long, global = true, value_name = "FILE", env = "BLKMESH_MANAGER_CA")]
    ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for a manager that requires one.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "BLKMESH_CLIENT_CERT",
        requires = "key"
    )]
    cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "BLKMESH_CLIENT_KEY",
        requires = "cert"
    )]
    key: Option<std::path::PathBuf>,
    /// File holding the manager's bearer token (sent as
    /// `authorization: Bearer <token>`).
    #[arg(long, global = true, value_name = "FILE", env = "BLKMESH_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
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
    /// vhost-user-blk frontends (the processes serving the exports).
    #[command(subcommand)]
    Frontend(FrontendCmd),
    /// Zones of an export over a zoned node (run by the frontend serving it).
    #[command(subcommand)]
    Zone(ZoneCmd),
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
    /// Configuration files (TOML) for `blkmesh-manager --config`.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// gRPC health check; exits 0 if the manager is SERVING.
    Health {
        /// Service to check ("" = the whole server).
        #[arg(long, default_value = "")]
        service: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Check a configuration file offline (no manager is contacted): its
    /// syntax, keys and types, and every rule AddNode and AddExport apply to
    /// its nodes and exports as a whole (names, children, sizes, throttle
    /// groups, duplicate ids and sockets...). Paths are not looked at (they
    /// are the paths the manager and workers see), nor is the manager's
    /// state. Prints each problem as FILE:LINE:COLUMN: FIELD: PROBLEM and
    /// exits with status 2 if there is one; deploy/config/blkmesh.toml
    /// documents the format.
    Check {
        /// The file.
        file: std::path::PathBuf,
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
    /// Limits the node imposes on the graph above it, as QEMU's blkdebug
    /// (to exercise request splitting and bounce buffers; 0 = the child's):
    ///   --max-transfer BYTES   largest request (a multiple of 512)
    ///   --max-segments N       most memory segments per request
    ///   --buf-alignment BYTES  buffer alignment (a power of two, at most 4k)
    #[command(verbatim_doc_comment)]
    AddFaultInjection {
        name: String,
        /// Child node.
        #[arg(long)]
        child: String,
        /// A fault rule; repeat for more (at most 64). None: the node passes
        /// everything through until rules are set (`node set-faults`).
        #[arg(long = "rule", value_name = "RULE", value_parser = parse_rule)]
        rules: Vec<FaultRule>,
        #[command(flatten)]
        knobs: FaultKnobs,
    },
    /// Add a zoned node: a host-managed zoned device emulated over a child
    /// node (its size in whole zones). Raw windows over it must cover whole
    /// zones; exports over it keep their queues on one worker. The zone
    /// layout is fixed: no option changes later, and no resize.
    AddZoned {
        name: String,
        /// Child node (a regular, non-zoned node).
        #[arg(long)]
        child: String,
        /// Zone size, e.g. 256M (a power of two, at least 64k).
        #[arg(long, value_parser = parse_size, value_name = "SIZE")]
        zone_size: u64,
        /// Writable bytes per zone (a multiple of 4k; default: the zone size).
        #[arg(long, value_parser = parse_size, value_name = "SIZE", default_value = "0", hide_default_value = true)]
        zone_capacity: u64,
        /// Most open zones (default: no limit).
        #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
        max_open: u32,
        /// Most active (open or closed) zones, at least --max-open (default:
        /// no limit; needs --max-open).
        #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
        max_active: u32,
        /// Absolute path of the file keeping zone conditions and write
        /// pointers (created by the worker if missing; one per node).
        #[arg(long, value_name = "PATH")]
        metadata: String,
    },
    /// Grow a node, live (like QEMU's block_resize); exports over it stay
    /// connected and their VMMs see the new capacity.
    ///
    /// An io_uring file is extended; an io_uring block device is re-read
    /// (grow the device first); a null node or a raw window with an explicit
    /// size gets the new size; a raw window to the end of its child, a
    /// throttle and a fault-injection node grow their child. Shrinking is
    /// refused, as are nvme, vhost-user and vdpa nodes, and zoned nodes with
    /// the nodes under and over them.
    Resize {
        name: String,
        /// New size, e.g. 2G (a multiple of 512, at least the current size).
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// Change a throttle node's limits live; exports over it stay connected.
    ///
    /// The limits given replace all of the node's limits (unset ones become
    /// unlimited), with the same flags as add-throttle. In a throttle group
    /// the new limits apply to every node of the group: a group has one set
    /// of limits, so all its nodes are updated at once.
    SetThrottle {
        name: String,
        #[command(flatten)]
        limits: ThrottleArgs,
    },
    /// Change a fault-injection node's rules and limits live.
    ///
    /// --rule (repeatable, syntax as in add-fault-injection) replaces every
    /// rule, --clear-rules removes them; the limit flags change only what
    /// they name (0 = the child's own limit).
    #[command(group(
        ArgGroup::new("change")
            .required(true)
            .multiple(true)
            .args(["rules", "clear_rules", "max_transfer", "max_segments", "buf_alignment"])
    ))]
    SetFaults {
        name: String,
        /// A fault rule; repeat for more (at most 64). Replaces all rules.
        #[arg(long = "rule", value_name = "RULE", value_parser = parse_rule)]
        rules: Vec<FaultRule>,
        /// Remove every rule.
        #[arg(long, conflicts_with = "rules")]
        clear_rules: bool,
        #[command(flatten)]
        knobs: FaultKnobs,
    },
    /// Make a protocol node (io_uring, nvme, vhost-user, vdpa) read-only
    /// or writable, live. Refused while a writable export is over it.
    SetReadOnly {
        name: String,
        /// on or off.
        #[arg(value_parser = parse_on_off, value_name = "on|off", action = clap::ArgAction::Set)]
        value: bool,
    },
    /// Turn O_DIRECT of an io_uring node on or off, live.
    SetDirect {
        name: String,
        /// on or off.
        #[arg(value_parser = parse_on_off, value_name = "on|off", action = clap::ArgAction::Set)]
        value: bool,
    },
    /// Change the latency a null node adds per request, live.
    SetLatency {
        name: String,
        /// Latency with a unit: 0ns, 100us, 5ms, 1s (at most 10s).
        #[arg(value_parser = parse_duration_ns, value_name = "DURATION")]
        latency: u64,
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

/// The limit knobs of a fault-injection node (unset: unchanged, or 0 when adding).
#[derive(Debug, Args)]
struct FaultKnobs {
    /// Largest request in bytes, e.g. 64k (a multiple of 512; 0 = the child's).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    max_transfer: Option<u64>,
    /// Most memory segments per request (0 = the child's).
    #[arg(long, value_name = "N")]
    max_segments: Option<u32>,
    /// Required buffer alignment in bytes, e.g. 4k (a power of two, at most
    /// 4k; 0 = the child's).
    #[arg(long, value_name = "BYTES", value_parser = parse_size_u32)]
    buf_alignment: Option<u32>,
}

impl FaultKnobs {
    /// Sets the given knobs in `o`.
    fn apply(&self, o: &mut FaultInjectionOptions) {
        if let Some(v) = self.max_transfer {
            o.max_transfer = v;
        }
        if let Some(v) = self.max_segments {
            o.max_segments = v;
        }
        if let Some(v) = self.buf_alignment {
            o.buf_alignment = v;
        }
    }
}

/// `on`/`off` (also yes/no, true/false, 1/0).
fn parse_on_off(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "yes" | "true" | "1" => Ok(true),
        "off" | "no" | "false" | "0" => Ok(false),
        _ => Err(format!("expected on or off (got {s:?})")),
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
        /// placing them all on one. Refused over a throttle without a group
        /// and over a zoned node.
        #[arg(long)]
        spread: bool,
    },
    /// Remove an export.
    Remove { id: String },
    /// List exports.
    List,
}

#[derive(Debug, Subcommand)]
enum ZoneCmd {
    /// Report the zones of an export: START, LENGTH, CAPACITY, write
    /// pointer, TYPE and CONDITION of each.
    Report {
        /// Export id.
        export: String,
        /// From the zone containing this byte offset (k/M/G/T suffixes).
        #[arg(long, value_parser = parse_size, default_value = "0")]
        offset: u64,
        /// At most N zones (0 = up to 4096).
        #[arg(long, value_name = "N", default_value_t = 0)]
        count: u32,
    },
    /// Open a zone explicitly.
    Open(ZoneAt),
    /// Close an open zone.
    Close(ZoneAt),
    /// Make a zone full.
    Finish(ZoneAt),
    /// Reset a zone: empty, write pointer at its start.
    Reset(ZoneAt),
    /// Reset every zone of an export.
    ResetAll {
        /// Export id.
        export: String,
    },
}

/// The zone of an action.
#[derive(Debug, Args)]
struct ZoneAt {
    /// Export id.
    export: String,
    /// Start of the zone in bytes (a multiple of the zone size; k/M/G/T suffixes).
    #[arg(value_parser = parse_size)]
    offset: u64,
}

#[derive(Debug, Subcommand)]
enum FrontendCmd {
    /// List the frontends the manager has seen since it started, and the
    /// exports each serves, waits for or failed to open.
    List,
}

#[derive(Debug, Subcommand)]
enum WorkerCmd {
    /// List workers.
    List,
    /// Move one queue of an export to another (live) worker, without
    /// failing any request. The queues of an export over a zoned node stay
    /// on one worker: move them all with `node move`.
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
        // A connection that failed at the first call (a refused client
        // certificate) says why.
        Failure {
            code: code_name(s.code()),
            message: blkmesh_proto::client::status_message(&s),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::Connect { .. } => "UNAVAILABLE",
            ClientError::Url { .. }
            | ClientError::ReadFile { .. }
            | ClientError::Token(_)
            | ClientError::TlsOptions { .. }
            | ClientError::Tls { .. } => "INVALID_ARGUMENT",
        };
        Failure {
            code,
            message: e.to_string(),
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
    // Offline: no runtime, no manager.
    if let Command::Config(ConfigCmd::Check { file }) = &cli.command {
        return config_check(file, cli.json);
    }
    let tls_without_cert = cli.addr.starts_with("https://") && cli.cert.is_none();
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
        Err(mut f) => {
            // TLS 1.3: a manager that wants a client certificate closes the
            // connection after the handshake, which the first call sees.
            if tls_without_cert
                && matches!(f.code, "CANCELLED" | "UNKNOWN")
                && !f.message.contains("client certificate")
            {
                f.message.push_str(
                    " (if the manager requires client certificates, pass --cert and --key)",
                );
            }
            eprintln!("error: {}: {}", f.code, f.message);
            ExitCode::FAILURE
        }
    }
}

/// Connects to the manager; `streaming` calls get no overall deadline.
async fn connect(cli: &Cli, streaming: bool) -> Result<ManagerChannel, Failure> {
    let mut config =
        ClientConfig::new(cli.addr.clone()).with_connect_timeout(Duration::from_secs(5));
    config.ca_file = cli.ca.clone();
    config.cert_file = cli.cert.clone();
    config.key_file = cli.key.clone();
    config.token_file = cli.token_file.clone();
    if !streaming {
        // A 30 s deadline per call, except for streams that run until stopped.
        config = config.with_timeout(Duration::from_secs(30));
    }
    Ok(config.connect().await?)
}

/// `config check`: exit status 0 (valid) or 2 (not), without a manager.
fn config_check(file: &std::path::Path, json: bool) -> ExitCode {
    use std::io::Write;
    let result = blkmesh_manager::config::check(file);
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    match result {
        Ok(config) => {
            let _ = if json {
                let v = serde_json::json!({
                    "file": config.file(),
                    "valid": true,
                    "nodes": config.nodes().iter().map(|n| n.spec.name.as_str()).collect::<Vec<_>>(),
                    "exports": config.exports().iter().map(|e| serde_json::json!({
                        "id": e.export.id,
                        "node": e.export.node,
                        "socket": e.export.socket,
                    })).collect::<Vec<_>>(),
                });
                writeln!(stdout, "{v}")
            } else {
                writeln!(
                    stdout,
                    "{}: valid: {} node{}, {} export{}",
                    config.file(),
                    config.nodes().len(),
                    if config.nodes().len() == 1 { "" } else { "s" },
                    config.exports().len(),
                    if config.exports().len() == 1 { "" } else { "s" },
                )
            };
            ExitCode::SUCCESS
        }
        Err(errors) => {
            if json {
                let v = serde_json::json!({
                    "file": file.display().to_string(),
                    "valid": false,
                    "errors": errors.0.iter().map(|e| serde_json::json!({
                        "line": e.position.map(|p| p.0),
                        "column": e.position.map(|p| p.1),
                        "field": e.field,
                        "message": e.message,
                    })).collect::<Vec<_>>(),
                });
                let _ = writeln!(stdout, "{v}");
            }
            for e in &errors.0 {
                let _ = writeln!(stderr, "{e}");
            }
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let out = Output { json: cli.json };
    let streaming = matches!(cli.command, Command::Events { .. });
    let channel = connect(&cli, streaming).await?;
    match cli.command {
        Command::Node(cmd) => node(cmd, channel, out).await,
        Command::Export(cmd) => export(cmd, channel, out).await,
        Command::Worker(cmd) => worker(cmd, channel, out).await,
        Command::Frontend(FrontendCmd::List) => {
            let frontends = FrontendServiceClient::new(channel)
                .list_frontends(ListFrontendsRequest {})
                .await?
                .into_inner()
                .frontends;
            out.frontends(&frontends);
            Ok(())
        }
        Command::Zone(cmd) => zone(cmd, channel, out).await,
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
        Command::Config(_) => Err(Failure {
            code: "INTERNAL",
            message: "config commands run without a manager".into(),
        }),
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

async fn events(channel: ManagerChannel, out: Output, count: Option<u64>) -> Result<(), Failure> {
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

async fn node(cmd: NodeCmd, channel: ManagerChannel, out: Output) -> Result<(), Failure> {
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
        NodeCmd::AddFaultInjection {
            name,
            child,
            rules,
            knobs,
        } => {
            let mut o = FaultInjectionOptions {
                child,
                rules,
                ..Default::default()
            };
            knobs.apply(&mut o);
            NodeSpec {
                name,
                driver: Some(Driver::FaultInjection(o)),
            }
        }
        NodeCmd::AddZoned {
            name,
            child,
            zone_size,
            zone_capacity,
            max_open,
            max_active,
            metadata,
        } => NodeSpec {
            name,
            driver: Some(Driver::Zoned(ZonedOptions {
                child,
                zone_size,
                zone_capacity,
                max_open_zones: max_open,
                max_active_zones: max_active,
                metadata_path: metadata,
            })),
        },
        NodeCmd::Resize { name, size } => {
            let node = client
                .resize_node(ResizeNodeRequest { name, size })
                .await?
                .into_inner()
                .node
                .unwrap_or_default();
            out.node(&node);
            return Ok(());
        }
        NodeCmd::SetThrottle { name, limits } => {
            let node = modify(&mut client, name, |spec| match &mut spec.driver {
                Some(Driver::Throttle(o)) => {
                    o.limits = Some(limits.limits());
                    Ok(())
                }
                _ => Err(wrong_kind(spec, "set-throttle", "throttle nodes")),
            })
            .await?;
            out.node(&node);
            return Ok(());
        }
        NodeCmd::SetFaults {
            name,
            rules,
            clear_rules,
            knobs,
        } => {
            let node = modify(&mut client, name, |spec| match &mut spec.driver {
                Some(Driver::FaultInjection(o)) => {
                    if clear_rules {
                        o.rules.clear();
                    } else if !rules.is_empty() {
                        o.rules = rules;
                    }
                    knobs.apply(o);
                    Ok(())
                }
                _ => Err(wrong_kind(spec, "set-faults", "fault-injection nodes")),
            })
            .await?;
            out.node(&node);
            return Ok(());
        }
        NodeCmd::SetReadOnly { name, value } => {
            let node = modify(&mut client, name, |spec| {
                match &mut spec.driver {
                    Some(Driver::IoUring(o)) => o.read_only = value,
                    Some(Driver::NvmeIoUring(o)) => o.read_only = value,
                    Some(Driver::VirtioBlkVhostUser(o)) => o.read_only = value,
                    Some(Driver::VirtioBlkVhostVdpa(o)) => o.read_only = value,
                    _ => {
                        return Err(wrong_kind(
                            spec,
                            "set-read-only",
                            "io_uring, nvme_io_uring, virtio_blk_vhost_user and \
                             virtio_blk_vhost_vdpa nodes",
                        ))
                    }
                }
                Ok(())
            })
            .await?;
            out.node(&node);
            return Ok(());
        }
        NodeCmd::SetDirect { name, value } => {
            let node = modify(&mut client, name, |spec| match &mut spec.driver {
                Some(Driver::IoUring(o)) => {
                    o.direct = value;
                    Ok(())
                }
                _ => Err(wrong_kind(spec, "set-direct", "io_uring nodes")),
            })
            .await?;
            out.node(&node);
            return Ok(());
        }
        NodeCmd::SetLatency { name, latency } => {
            let node = modify(&mut client, name, |spec| match &mut spec.driver {
                Some(Driver::Null(o)) => {
                    o.latency_ns = latency;
                    Ok(())
                }
                _ => Err(wrong_kind(spec, "set-latency", "null nodes")),
            })
            .await?;
            out.node(&node);
            return Ok(());
        }
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

/// Fetches node `name`, lets `edit` change its spec and sends it back with
/// UpdateNode; returns the updated node.
async fn modify(
    client: &mut NodeServiceClient<ManagerChannel>,
    name: String,
    edit: impl FnOnce(&mut NodeSpec) -> Result<(), Failure>,
) -> Result<NodeInfo, Failure> {
    let mut spec = client
        .get_node(GetNodeRequest { name: name.clone() })
        .await?
        .into_inner()
        .node
        .and_then(|n| n.spec)
        .ok_or_else(|| Failure {
            code: "INTERNAL",
            message: format!("the manager sent node {name} without its spec"),
        })?;
    edit(&mut spec)?;
    Ok(client
        .update_node(UpdateNodeRequest { node: Some(spec) })
        .await?
        .into_inner()
        .node
        .unwrap_or_default())
}

/// A command applied to a node of the wrong kind.
fn wrong_kind(spec: &NodeSpec, command: &str, applies_to: &str) -> Failure {
    let driver = match &spec.driver {
        None => "none",
        Some(Driver::IoUring(_)) => "io_uring",
        Some(Driver::Null(_)) => "null",
        Some(Driver::NvmeIoUring(_)) => "nvme_io_uring",
        Some(Driver::VirtioBlkVhostUser(_)) => "virtio_blk_vhost_user",
        Some(Driver::VirtioBlkVhostVdpa(_)) => "virtio_blk_vhost_vdpa",
        Some(Driver::Raw(_)) => "raw",
        Some(Driver::Throttle(_)) => "throttle",
        Some(Driver::FaultInjection(_)) => "fault_injection",
        Some(Driver::Zoned(_)) => "zoned",
    };
    Failure {
        code: "INVALID_ARGUMENT",
        message: format!(
            "node {} is a {driver} node; {command} applies to {applies_to}",
            spec.name
        ),
    }
}

async fn export(cmd: ExportCmd, channel: ManagerChannel, out: Output) -> Result<(), Failure> {
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

async fn zone(cmd: ZoneCmd, channel: ManagerChannel, out: Output) -> Result<(), Failure> {
    let mut client = ZoneServiceClient::new(channel);
    let (action, name, at) = match cmd {
        ZoneCmd::Report {
            export,
            offset,
            count,
        } => {
            let report = client
                .report_zones(ReportZonesRequest {
                    export: export.clone(),
                    offset,
                    max_zones: count,
                })
                .await?
                .into_inner();
            out.zone_report(&export, &report);
            return Ok(());
        }
        ZoneCmd::Open(at) => (ZoneAction::Open, "open", at),
        ZoneCmd::Close(at) => (ZoneAction::Close, "close", at),
        ZoneCmd::Finish(at) => (ZoneAction::Finish, "finish", at),
        ZoneCmd::Reset(at) => (ZoneAction::Reset, "reset", at),
        ZoneCmd::ResetAll { export } => (
            ZoneAction::ResetAll,
            "reset-all",
            ZoneAt { export, offset: 0 },
        ),
    };
    let zone = client
        .manage_zone(ManageZoneRequest {
            export: at.export.clone(),
            action: action as i32,
            offset: at.offset,
        })
        .await?
        .into_inner()
        .zone;
    out.zone_action(&at.export, name, zone.as_ref());
    Ok(())
}

async fn worker(cmd: WorkerCmd, channel: ManagerChannel, out: Output) -> Result<(), Failure> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn on_off_values() {
        assert_eq!(parse_on_off("on"), Ok(true));
        assert_eq!(parse_on_off("OFF"), Ok(false));
        assert!(parse_on_off("maybe").is_err());
    }
}
