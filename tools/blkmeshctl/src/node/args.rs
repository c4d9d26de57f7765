//! What `node` takes on the command line: its subcommands, the throttle
//! limits and fault-injection knobs they share, and `on`/`off` values.

use blkmesh_proto::v1::{Bucket, FaultInjectionOptions, FaultRule, ThrottleLimits};
use clap::{ArgGroup, Args, Subcommand};

use blkmesh_graph::rule::{parse_duration_ns, parse_rule};
use blkmesh_graph::size::{parse_size, parse_size_u32};

#[derive(Debug, Subcommand)]
pub(crate) enum NodeCmd {
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
    /// Add a qcow2 image: the image is in the --file node (an io_uring
    /// node); its backing image, if any, is the --backing node.
    AddQcow2 {
        name: String,
        /// The io_uring node holding the image.
        #[arg(long)]
        file: String,
        /// The backing node (an io_uring node with a raw image, or a qcow2
        /// node); required when the image header names a backing file.
        #[arg(long, conflicts_with_all = ["no_backing", "backing_from_header"])]
        backing: Option<String>,
        /// Follow the backing file the header names, inside a directory the
        /// manager allows (--image-dir), as read-only nodes NAME-b1, ...
        /// (or a node that already holds that file).
        #[arg(long, conflicts_with = "no_backing")]
        backing_from_header: bool,
        /// Read without the backing file the header names (unallocated
        /// clusters read as zeroes).
        #[arg(long)]
        no_backing: bool,
        /// Open read-only (a base image shared by several overlays).
        #[arg(long)]
        read_only: bool,
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
pub(crate) struct ThrottleArgs {
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
    pub(crate) fn limits(&self) -> ThrottleLimits {
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
pub(crate) struct FaultKnobs {
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
    pub(crate) fn apply(&self, o: &mut FaultInjectionOptions) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_off_values() {
        assert_eq!(parse_on_off("on"), Ok(true));
        assert_eq!(parse_on_off("OFF"), Ok(false));
        assert!(parse_on_off("maybe").is_err());
    }
}
