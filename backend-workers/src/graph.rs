//! Opening an export's node graph.
//!
//! The plan names a root node and carries its whole subtree. Opening walks it
//! from the root: format nodes (`raw`) narrow a byte window, and the protocol
//! leaf (`io_uring` through libblkio, or `null`) does the I/O. Limits propagate
//! from the leaf up to the export, as QEMU's refresh_limits does: a
//! fault-injection node's `max_transfer` / `max_segments` / `buf_alignment`
//! knobs make them stricter (the smallest non-zero maximum, the largest
//! alignment). The queue loop splits or bounces requests that break them
//! (see `split.rs`), so the limits are a promise to the frontend, not a
//! condition for success.
//!
//! Zones propagate the same way (see `zoned.rs`): a `zoned` node emulates a
//! host-managed device over its regular child (whole zones of the child
//! only), an `io_uring` leaf on a Linux zoned block device is passed
//! through; raw windows above must be zone-aligned and filters pass zone
//! operations through. The export's [`Limits::zones`] says what it sees
//! (model NONE for a regular graph), and a zoned graph takes no discard.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blkmesh_ipc::buckets::BucketSet;
use blkmesh_proto::ipc::v1::Limits;
use blkmesh_proto::v1::{
    node_spec::Driver, ExportPlan, FaultInjectionOptions, NodeSpec, ZoneInfo, ZonedOptions,
};

use crate::errno::Errno;
pub use crate::errno::OpenError;
use crate::split::min_nonzero;
use crate::stages::{Faults, Stage, Throttle};
use crate::zoned::{self, Geometry, SysZoned, ZoneLayer, ZoneLimits, ZonedDevice};

/// Deepest graph accepted (guards against cycles in a hostile plan).
const MAX_DEPTH: usize = 16;

/// libblkio queues of a driver that cannot add queues after start: created
/// at open, handed out as queues attach and given back when they detach.
pub type QueuePool = Arc<Mutex<Vec<blkio::Blkioq>>>;

/// The protocol leaf of a graph.
#[derive(Clone)]
pub enum Leaf {
    /// A libblkio driver instance (io_uring, nvme-io_uring,
    /// virtio-blk-vhost-user, virtio-blk-vhost-vdpa), shared by the queues
    /// (each has its own libblkio queue) and by memory registration.
    Blkio {
        driver: &'static str,
        blkio: Arc<Mutex<blkio::Blkio>>,
        /// `None` when the driver adds queues on demand.
        pool: Option<QueuePool>,
        /// This worker's life claim on the leaf (crate::claim), held while
        /// any queue or the graph still has the leaf.
        claim: Option<Arc<crate::claim::LifeClaim>>,
    },
    /// No storage: reads return zeroes, writes are dropped.
    Null { latency: Duration },
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Leaf::Blkio { driver, .. } => write!(f, "Blkio({driver})"),
            Leaf::Null { latency } => write!(f, "Null({latency:?})"),
        }
    }
}

/// An opened graph, ready for queues to attach.
#[derive(Clone, Debug)]
pub struct OpenedGraph {
    pub leaf: Leaf,
    /// Filters and formats from the export down to the leaf.
    pub stages: Vec<Stage>,
    pub limits: Limits,
    /// GET_ID answer: the serial, NUL-padded to 20 bytes.
    pub serial: [u8; 20],
    /// The leaf is a regular file: libblkio's discard (fallocate with
    /// NO_HIDE_STALE) only works on block devices, so discard becomes a
    /// hole punch (write-zeroes that may unmap).
    pub discard_punches_holes: bool,
    /// Names of the export's root node and of the leaf, for statistics.
    pub root_node: String,
    pub leaf_node: String,
    /// The zone layer, when the graph is zoned.
    pub zoned: Option<ZoneAccess>,
}

/// How the export sees the graph's zone layer.
#[derive(Clone, Debug)]
pub struct ZoneAccess {
    pub layer: Arc<ZoneLayer>,
    /// Index of the layer's [`Stage::Zoned`] in [`OpenedGraph::stages`].
    pub stage: usize,
    /// Bytes the windows above the layer move requests by (a multiple of
    /// the zone size): export offset + shift = layer offset.
    pub shift: u64,
    /// The layer's zones the export sees: `first..first + count`.
    pub first: u32,
    pub count: u32,
    /// As reported in [`Limits::zones`].
    pub info: ZoneInfo,
}

impl ZoneAccess {
    /// The layer's zones the export sees.
    pub fn zones(&self) -> std::ops::Range<u32> {
        self.first..self.first + self.count
    }
}

/// Largest zone append when the graph has no maximum transfer.
pub const DEFAULT_MAX_APPEND: u64 = 1 << 20;

/// Most zones a single report over the control channel carries.
pub const MAX_REPORT_ZONES: u32 = 4096;

impl OpenedGraph {
    pub fn read_only(&self) -> bool {
        self.limits.read_only
    }
}

/// Limits the nodes above the leaf impose (the blkdebug-style knobs of
/// fault-injection nodes), merged into the leaf's as QEMU's refresh_limits
/// does: the strictest wins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Imposed {
    /// Bytes; 0 = none.
    max_transfer: u64,
    /// 0 = none.
    max_segments: u32,
    /// 0 = none.
    buf_alignment: u32,
}

impl Imposed {
    /// Adds a fault-injection node's knobs (checked again here: the plan
    /// comes from another process).
    fn add(&mut self, name: &str, f: &FaultInjectionOptions) -> Result<(), OpenError> {
        if f.max_transfer % 512 != 0 || f.max_transfer > u32::MAX as u64 * 512 {
            return Err(OpenError::inval(format!(
                "node {name}: max_transfer {} is not a multiple of 512 that fits 32-bit sectors",
                f.max_transfer
            )));
        }
        if f.buf_alignment != 0 && (!f.buf_alignment.is_power_of_two() || f.buf_alignment > 4096) {
            return Err(OpenError::inval(format!(
                "node {name}: buf_alignment {} is not a power of two up to 4096",
                f.buf_alignment
            )));
        }
        self.max_transfer = min_nonzero(self.max_transfer, f.max_transfer);
        self.max_segments = min_nonzero(self.max_segments, f.max_segments);
        self.buf_alignment = self.buf_alignment.max(f.buf_alignment);
        Ok(())
    }

    /// The leaf's limits made as strict as the nodes above ask.
    fn apply(&self, leaf: Limits) -> Limits {
        Limits {
            max_transfer: min_nonzero(leaf.max_transfer, self.max_transfer),
            max_segments: min_nonzero(leaf.max_segments, self.max_segments),
            buf_alignment: leaf.buf_alignment.max(self.buf_alignment).max(1),
            ..leaf
        }
    }
}

/// How a libblkio leaf is opened.
struct BlkioLeaf<'a> {
    driver: &'static str,
    path: &'a str,
    direct: Option<bool>,
    read_only: bool,
}

impl BlkioLeaf<'_> {
    /// Whether the worker opens the leaf itself, with a claim: the drivers
    /// whose requests the kernel runs on this process's behalf.
    fn claimed(&self) -> bool {
        matches!(self.driver, "io_uring" | "nvme-io_uring")
    }
}

/// A `zoned` node met on the way down, with the windows above it (in its
/// coordinates).
struct ZoneMark<'a> {
    name: &'a str,
    opts: &'a ZonedOptions,
    /// Where its stage goes in the list.
    stage: usize,
    base: u64,
    window: Option<u64>,
    /// The raw nodes above it: (name, offset, size).
    raws: Vec<(&'a str, u64, u64)>,
}

/// What the walk found at the leaf.
struct LeafFound {
    leaf: Leaf,
    name: String,
    dev_size: u64,
    /// The leaf's limits (size 0, read_only false).
    limits: Limits,
    read_only: bool,
    discard_punches_holes: bool,
    /// The leaf is a Linux zoned block device (path, what sysfs says).
    zoned: Option<(String, SysZoned)>,
}

/// Where sysfs is (a test may point elsewhere).
const SYS_ROOT: &str = "/sys";

/// Opens the plan's graph.
pub fn open(plan: &ExportPlan) -> Result<OpenedGraph, OpenError> {
    let export = plan
        .export
        .as_ref()
        .ok_or_else(|| OpenError::inval("plan has no export"))?;
    // The manager validated the plan; the worker trusts no plan it did
    // not check (its arithmetic relies on these bounds).
    for node in &plan.nodes {
        blkmesh_graph::validate_node(node)
            .map_err(|e| OpenError::inval(format!("node {:?}: {e}", node.name)))?;
    }
    let nodes: HashMap<&str, &NodeSpec> = plan.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let lbs = match export.logical_block_size {
        0 => 512,
        v @ (512 | 4096) => v,
        v => {
            return Err(OpenError::inval(format!(
                "logical block size {v} is not 512 or 4096"
            )))
        }
    };
    let num_queues = export.num_queues.clamp(1, 64);

    // Walk down from the root, collecting stages and narrowing the window.
    let mut name = export.node.as_str();
    let mut base = 0u64;
    let mut window: Option<u64> = None; // size limit imposed by format nodes above
    let mut read_only = !export.writable;
    let mut stages = Vec::new();
    let mut imposed = Imposed::default();
    // Raw nodes since the root or the zoned node: (name, offset, size).
    let mut raws: Vec<(&str, u64, u64)> = Vec::new();
    let mut mark: Option<ZoneMark<'_>> = None;
    let mut found = None;
    for _ in 0..MAX_DEPTH {
        let node = nodes
            .get(name)
            .ok_or_else(|| OpenError::inval(format!("plan lacks node {name}")))?;
        let leaf = match &node.driver {
            Some(Driver::Raw(raw)) => {
                if raw.offset % 512 != 0 || raw.size % 512 != 0 {
                    return Err(OpenError::inval(format!(
                        "node {name}: raw offset and size must be multiples of 512"
                    )));
                }
                // `base`/`window` are in this node's coordinates; this
                // node's own size (if set) must contain them.
                if raw.size != 0 {
                    let w = window.unwrap_or(raw.size.saturating_sub(base));
                    if base.checked_add(w).is_none_or(|end| end > raw.size) || w == 0 {
                        return Err(OpenError::inval(format!(
                            "node {name}: window of {w} bytes at {base} does not fit its {} bytes",
                            raw.size
                        )));
                    }
                    window = Some(w);
                }
                base = base
                    .checked_add(raw.offset)
                    .ok_or_else(|| OpenError::inval(format!("node {name}: offset overflows")))?;
                raws.push((name, raw.offset, raw.size));
                stages.push(Stage::Window { offset: raw.offset });
                name = raw.child.as_str();
                continue;
            }
            Some(Driver::Zoned(z)) => {
                if let Some(m) = &mark {
                    return Err(OpenError::inval(format!(
                        "node {}: child {name} is zoned; a zoned node needs a regular child",
                        m.name
                    )));
                }
                // The windows above are in this node's coordinates; below
                // it, they start again from the child.
                mark = Some(ZoneMark {
                    name,
                    opts: z,
                    stage: stages.len(),
                    base,
                    window,
                    raws: std::mem::take(&mut raws),
                });
                base = 0;
                window = None;
                name = z.child.as_str();
                continue;
            }
            Some(Driver::Throttle(t)) => {
                let limits = t.limits.ok_or_else(|| {
                    OpenError::inval(format!("node {name}: throttle without limits"))
                })?;
                let buckets = if t.group.is_empty() {
                    BucketSet::private()
                } else {
                    BucketSet::group(&t.group)
                        .map_err(|e| OpenError::new(Errno::EIO, format!("node {name}: {e}")))?
                };
                stages.push(Stage::Throttle(Arc::new(Throttle::new(
                    name, &limits, buckets,
                ))));
                name = t.child.as_str();
                continue;
            }
            Some(Driver::FaultInjection(f)) => {
                imposed.add(name, f)?;
                let seed = name.bytes().fold(0x9e37_79b9_7f4a_7c15u64, |h, b| {
                    (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
                });
                stages.push(Stage::Faults(Arc::new(Faults::new(&f.rules, seed))));
                name = f.child.as_str();
                continue;
            }
            Some(Driver::IoUring(o)) => BlkioLeaf {
                driver: "io_uring",
                path: &o.path,
                direct: Some(o.direct),
                read_only: o.read_only,
            },
            Some(Driver::NvmeIoUring(o)) => BlkioLeaf {
                driver: "nvme-io_uring",
                path: &o.path,
                direct: None,
                read_only: o.read_only,
            },
            Some(Driver::VirtioBlkVhostUser(o)) => BlkioLeaf {
                driver: "virtio-blk-vhost-user",
                path: &o.path,
                direct: None,
                read_only: o.read_only,
            },
            Some(Driver::VirtioBlkVhostVdpa(o)) => BlkioLeaf {
                driver: "virtio-blk-vhost-vdpa",
                path: &o.path,
                direct: None,
                read_only: o.read_only,
            },
            Some(Driver::Null(opts)) => {
                if opts.size == 0 || opts.size % 512 != 0 {
                    return Err(OpenError::inval(format!(
                        "node {name}: null size must be a non-zero multiple of 512"
                    )));
                }
                found = Some(LeafFound {
                    leaf: Leaf::Null {
                        latency: Duration::from_nanos(opts.latency_ns),
                    },
                    name: name.to_string(),
                    dev_size: opts.size,
                    limits: Limits {
                        size: 0,
                        logical_block_size: lbs,
                        physical_block_size: lbs,
                        request_alignment: 1,
                        buf_alignment: 1,
                        optimal_io_size: 0,
                        max_transfer: 0,
                        max_segments: 0,
                        max_discard: u32::MAX as u64 * 512,
                        max_write_zeroes: u32::MAX as u64 * 512,
                        read_only: false,
                        zones: None,
                    },
                    read_only,
                    discard_punches_holes: false,
                    zoned: None,
                });
                break;
            }
            None => return Err(OpenError::inval(format!("node {name} has no driver"))),
        };
        // A libblkio protocol leaf.
        let sys = Path::new(SYS_ROOT);
        let zoned_dev = match leaf.driver {
            "io_uring" => zoned::probe_block_device(sys, Path::new(leaf.path)),
            "nvme-io_uring" if zoned::nvme_generic_is_zoned(sys, Path::new(leaf.path)) => {
                return Err(OpenError::new(
                    Errno::EOPNOTSUPP,
                    format!(
                        "node {name}: {} is a zoned (ZNS) namespace, and libblkio's nvme-io_uring \
                         driver has no zone commands; use an io_uring node on its block device \
                         (/dev/nvme...) instead",
                        leaf.path
                    ),
                ));
            }
            _ => None,
        };
        if zoned_dev.is_some() && leaf.direct == Some(false) {
            return Err(OpenError::inval(format!(
                "node {name}: {} is a zoned block device; it needs direct: true (the page cache \
                 does not write zones sequentially)",
                leaf.path
            )));
        }
        read_only |= leaf.read_only;
        let OpenedBlkio { blkio, pool, claim } = open_blkio(name, &leaf, read_only, num_queues)?;
        read_only |= blkio.get_bool("read-only").unwrap_or(false);
        let dev_size = blkio
            .get_u64("capacity")
            .map_err(|e| OpenError::blkio(name, "capacity", e))?;
        let limits = blkio_limits(name, &blkio, lbs)?;
        found = Some(LeafFound {
            leaf: Leaf::Blkio {
                driver: leaf.driver,
                blkio: Arc::new(Mutex::new(blkio)),
                pool,
                claim,
            },
            name: name.to_string(),
            dev_size,
            limits,
            read_only,
            discard_punches_holes: leaf.driver == "io_uring"
                && std::fs::metadata(leaf.path).is_ok_and(|m| m.is_file()),
            zoned: zoned_dev.map(|z| (leaf.path.to_string(), z)),
        });
        break;
    }
    let Some(found) = found else {
        return Err(OpenError::inval("graph deeper than 16 nodes (a cycle?)"));
    };
    let mut limits = imposed.apply(found.limits);
    limits.read_only = found.read_only;
    let zoned = match (mark, &found.zoned) {
        (None, None) => {
            limits.size = fit_window(&found.name, found.dev_size, base, window, lbs)?;
            limits.zones = Some(ZoneInfo::default());
            None
        }
        (Some(m), Some((path, _))) => {
            return Err(OpenError::inval(format!(
                "node {}: its child is the zoned device {path}; a zoned node needs a regular \
                 child (export the device directly: its zones pass through)",
                m.name
            )))
        }
        (Some(m), None) => {
            // Emulation over a regular child.
            let child_size = fit_window(&found.name, found.dev_size, base, window, lbs)?;
            let o = m.opts;
            let zone_size = o.zone_size;
            let capacity = if o.zone_capacity == 0 {
                zone_size
            } else {
                o.zone_capacity
            };
            let nr = child_size / zone_size;
            if nr == 0 {
                return Err(OpenError::inval(format!(
                    "node {}: its child has {child_size} bytes, less than one zone of {zone_size}",
                    m.name
                )));
            }
            if nr > zoned::MAX_ZONES {
                return Err(OpenError::inval(format!(
                    "node {}: {nr} zones of {zone_size} bytes are more than the {} supported; \
                     use larger zones",
                    m.name,
                    zoned::MAX_ZONES
                )));
            }
            let geo = Geometry {
                zone_size,
                capacity,
                nr_zones: nr as u32,
            };
            let zl = ZoneLimits {
                granularity: lbs,
                max_append: max_append(capacity, limits.max_transfer, lbs),
                max_open: o.max_open_zones,
                max_active: o.max_active_zones,
            };
            let layer = zoned::open_emulated(m.name, Path::new(&o.metadata_path), geo, zl)?;
            stages.insert(m.stage, Stage::Zoned(Arc::clone(&layer)));
            Some(zone_access(
                layer,
                m.stage,
                m.name,
                &m.raws,
                m.base,
                m.window,
                lbs,
                &mut limits,
            )?)
        }
        (None, Some((path, sys))) => {
            // A zoned device passed through: its zones, whole ones only.
            if sys.zone_size == 0 || !sys.zone_size.is_power_of_two() || sys.zone_size < 4096 {
                return Err(OpenError::inval(format!(
                    "node {}: zoned device {path} has zones of {} bytes (not a power of two)",
                    found.name, sys.zone_size
                )));
            }
            let nr = (found.dev_size / sys.zone_size).min(sys.nr_zones as u64) as u32;
            if nr == 0 {
                return Err(OpenError::inval(format!(
                    "node {}: zoned device {path} has no whole zone",
                    found.name
                )));
            }
            let granularity = sys.granularity.max(lbs);
            let zl = ZoneLimits {
                granularity,
                max_append: max_append(sys.zone_size, limits.max_transfer, granularity),
                max_open: sys.max_open,
                max_active: sys.max_active,
            };
            let dev = ZonedDevice::open(path, sys, nr, found.read_only, zl)?;
            let zl = ZoneLimits {
                max_append: max_append(dev.geometry().capacity, limits.max_transfer, granularity),
                ..zl
            };
            let dev = dev.with_limits(zl);
            let layer = Arc::new(ZoneLayer::Device(dev));
            let stage = stages.len();
            stages.push(Stage::Zoned(Arc::clone(&layer)));
            let name = found.name.clone();
            Some(zone_access(
                layer,
                stage,
                &name,
                &raws,
                base,
                window,
                lbs,
                &mut limits,
            )?)
        }
    };
    Ok(OpenedGraph {
        leaf: found.leaf,
        stages,
        limits,
        serial: serial(&export.serial, &export.id),
        discard_punches_holes: found.discard_punches_holes,
        root_node: export.node.clone(),
        leaf_node: found.name,
        zoned,
    })
}

/// Largest zone append: a zone's capacity, bounded by the graph's maximum
/// transfer (or [`DEFAULT_MAX_APPEND`] without one) so that an append
/// reaches the leaf as one request; a multiple of `granularity`.
fn max_append(capacity: u64, max_transfer: u64, granularity: u32) -> u64 {
    let g = granularity.max(1) as u64;
    let m = capacity.min(if max_transfer == 0 {
        DEFAULT_MAX_APPEND
    } else {
        max_transfer
    });
    (m - m % g).max(g)
}

/// The export's view of a zone layer whose node sees the windows
/// `raws` (base, window) above it: every window zone-aligned, the export a
/// whole number of zones. Sets the size, zone info and discard limit.
#[allow(clippy::too_many_arguments)]
fn zone_access(
    layer: Arc<ZoneLayer>,
    stage: usize,
    node: &str,
    raws: &[(&str, u64, u64)],
    base: u64,
    window: Option<u64>,
    lbs: u32,
    limits: &mut Limits,
) -> Result<ZoneAccess, OpenError> {
    let geo = layer.geometry();
    let zs = geo.zone_size;
    for (raw, offset, size) in raws {
        if offset % zs != 0 || size % zs != 0 {
            return Err(OpenError::inval(format!(
                "node {raw}: over zoned node {node}, raw offset ({offset}) and size ({size}) must \
                 be multiples of its zone size {zs}"
            )));
        }
    }
    let size = fit_window(node, geo.nr_zones as u64 * zs, base, window, lbs)?;
    let zl = layer.limits();
    let info = ZoneInfo {
        model: layer.model() as i32,
        zone_size: zs,
        zone_capacity: geo.capacity,
        nr_zones: (size / zs) as u32,
        max_open_zones: zl.max_open,
        max_active_zones: zl.max_active,
        write_granularity: zl.granularity,
        max_append: zl.max_append,
    };
    limits.size = size;
    // Zoned devices take no discard (a reset empties a zone).
    limits.max_discard = 0;
    limits.zones = Some(info);
    Ok(ZoneAccess {
        layer,
        stage,
        shift: base,
        first: (base / zs) as u32,
        count: info.nr_zones,
        info,
    })
}

/// Size of the export: what is left of the leaf after `base`, bounded by the
/// window, rounded down to the logical block size.
fn fit_window(
    name: &str,
    leaf_size: u64,
    base: u64,
    window: Option<u64>,
    lbs: u32,
) -> Result<u64, OpenError> {
    let avail = leaf_size.checked_sub(base).ok_or_else(|| {
        OpenError::inval(format!(
            "node {name}: window starts beyond its {leaf_size} bytes"
        ))
    })?;
    let size = match window {
        Some(w) if w > avail => {
            return Err(OpenError::inval(format!(
                "node {name}: window of {w} bytes at {base} does not fit its {leaf_size} bytes"
            )))
        }
        Some(w) => w,
        None => avail,
    };
    let size = size - size % lbs as u64;
    if size == 0 {
        return Err(OpenError::inval(format!(
            "node {name}: exported size is zero"
        )));
    }
    Ok(size)
}

/// A started libblkio instance.
struct OpenedBlkio {
    blkio: blkio::Blkio,
    pool: Option<QueuePool>,
    claim: Option<Arc<crate::claim::LifeClaim>>,
}

fn open_blkio(
    name: &str,
    leaf: &BlkioLeaf<'_>,
    read_only: bool,
    num_queues: u32,
) -> Result<OpenedBlkio, OpenError> {
    let path = leaf.path;
    let mut b =
        blkio::Blkio::new(leaf.driver).map_err(|e| OpenError::blkio(name, leaf.driver, e))?;
    let mut claim = None;
    if leaf.claimed() {
        // Opened here, with this worker's claim on it, so that a
        // replacement can wait out its requests (crate::claim).
        let access = crate::claim::Access {
            // nvme-io_uring passthrough needs only read access.
            write: !read_only && leaf.driver == "io_uring",
            direct: leaf.direct.unwrap_or(false),
        };
        let (fd, life) = crate::claim::open(Path::new(path), access).map_err(|e| {
            let errno = Errno::new(e.errno()).unwrap_or(Errno::EIO);
            OpenError::new(errno, format!("node {name}: open {e}"))
        })?;
        claim = Some(life);
        b.set_i32("fd", fd.as_raw_fd())
            .map_err(|e| OpenError::blkio(name, "fd", e))?;
        // libblkio owns the descriptor from here on.
        let _ = fd.into_raw_fd();
    } else {
        b.set_str("path", path)
            .map_err(|e| OpenError::blkio(name, "path", e))?;
        if let Some(direct) = leaf.direct {
            b.set_bool("direct", direct)
                .map_err(|e| OpenError::blkio(name, "direct", e))?;
        }
    }
    b.set_bool("read-only", read_only)
        .map_err(|e| OpenError::blkio(name, "read-only", e))?;
    // io_uring refused to this process (a seccomp profile): say so.
    let why = |mut e: OpenError| {
        if leaf.driver.contains("io_uring") {
            if let Err(why) = crate::probe::io_uring() {
                e.message.push_str(&format!(" ({why})"));
            }
        }
        e
    };
    b.connect()
        .map_err(|e| why(OpenError::blkio(name, &format!("open {path}"), e)))?;
    // Drivers that can add queues get one per attached virtqueue later;
    // the others get the export's queue count now (bounded by the device).
    let can_add = b.get_bool("can-add-queues").unwrap_or(false);
    let n = if can_add {
        0
    } else {
        let max = b.get_i32("max-queues").unwrap_or(1).max(1) as u32;
        num_queues.min(max) as i32
    };
    b.set_i32("num-queues", n)
        .map_err(|e| OpenError::blkio(name, "num-queues", e))?;
    let started = b
        .start()
        .map_err(|e| why(OpenError::blkio(name, "start", e)))?;
    let pool = (!can_add).then(|| Arc::new(Mutex::new(started.queues)));
    Ok(OpenedBlkio {
        blkio: b,
        pool,
        claim: claim.map(Arc::new),
    })
}

fn blkio_limits(name: &str, b: &blkio::Blkio, lbs: u32) -> Result<Limits, OpenError> {
    let get_i32 = |p: &str| b.get_i32(p).map_err(|e| OpenError::blkio(name, p, e));
    let get_u64 = |p: &str| b.get_u64(p).map_err(|e| OpenError::blkio(name, p, e));
    let request_alignment = get_i32("request-alignment")?.max(1) as u32;
    if lbs % request_alignment != 0 {
        return Err(OpenError::inval(format!(
            "node {name}: export block size {lbs} is not a multiple of the device's request alignment {request_alignment}"
        )));
    }
    let phys = get_i32("optimal-io-alignment").unwrap_or(0).max(0) as u32;
    let unlimited = |v: u64| if v == 0 { u32::MAX as u64 * 512 } else { v };
    Ok(Limits {
        size: 0,
        logical_block_size: lbs,
        physical_block_size: phys.max(lbs),
        request_alignment,
        // A power of two by libblkio's contract; rounded up if not (stricter).
        buf_alignment: (get_i32("buf-alignment")?.max(1) as u32).next_power_of_two(),
        optimal_io_size: get_i32("optimal-io-size").unwrap_or(0).max(0) as u32,
        max_transfer: get_i32("max-transfer").unwrap_or(0).max(0) as u64,
        max_segments: get_i32("max-segments").unwrap_or(0).max(0) as u32,
        max_discard: unlimited(get_u64("max-discard-len").unwrap_or(0)),
        max_write_zeroes: unlimited(get_u64("max-write-zeroes-len").unwrap_or(0)),
        read_only: false,
        zones: None,
    })
}

fn serial(serial: &str, id: &str) -> [u8; 20] {
    let s = if serial.is_empty() { id } else { serial };
    let mut out = [0u8; 20];
    for (o, c) in out
        .iter_mut()
        .zip(s.bytes().filter(|c| c.is_ascii_graphic() || *c == b' '))
    {
        *o = c;
    }
    out
}

#[cfg(test)]
mod tests;
