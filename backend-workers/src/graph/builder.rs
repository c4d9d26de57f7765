//! The walk down a plan's graph, from the export's root node to its leaf:
//! one method per node kind, each adding its stage, narrowing the window or
//! tightening the limits, then [`GraphBuilder::finish`] at the leaf.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blkmesh_ipc::buckets::BucketSet;
use blkmesh_proto::ipc::v1::Limits;
use blkmesh_proto::v1::{
    FaultInjectionOptions, NodeSpec, NullOptions, Qcow2Options, RawOptions, ThrottleOptions,
    VhostUserBlkExport, ZoneInfo, ZonedOptions,
};

use super::blkio::{blkio_limits, open_blkio, BlkioLeaf, OpenedBlkio};
use super::limits::{fit_window, Imposed};
use super::qcow2::{self, Qcow2Mark};
use super::types::{Leaf, OpenedGraph};
use super::zones::{device_layer, emulated_layer, zone_access, ZoneWindows};
use crate::errno::{Errno, OpenError};
use crate::stages::{Faults, Stage, Throttle};
use crate::zoned::{self, SysZoned};

/// Where sysfs is (a test may point elsewhere).
const SYS_ROOT: &str = "/sys";

/// A `zoned` node met on the way down, with the windows above it (in its
/// coordinates).
struct ZoneMark<'a> {
    name: &'a str,
    opts: &'a ZonedOptions,
    /// Where its stage goes in the list.
    stage: usize,
    windows: ZoneWindows<'a>,
}

/// What the walk found at the leaf.
pub(super) struct LeafFound {
    leaf: Leaf,
    name: String,
    /// The leaf's own descriptor, when the worker opened it (io_uring).
    file: Option<std::fs::File>,
    path: String,
    direct: bool,
    dev_size: u64,
    /// The leaf's limits (size 0, read_only false).
    limits: Limits,
    read_only: bool,
    discard_punches_holes: bool,
    /// The leaf is a Linux zoned block device (path, what sysfs says).
    zoned: Option<(String, SysZoned)>,
}

/// The graph so far, from the root down to the node being walked.
pub(super) struct GraphBuilder<'a> {
    /// The export's logical block size, and its virtqueues.
    lbs: u32,
    num_queues: u32,
    /// Where the export starts and how large it may be, in the current
    /// node's coordinates (raw windows above narrow it).
    base: u64,
    window: Option<u64>,
    read_only: bool,
    stages: Vec<Stage>,
    imposed: Imposed,
    /// Raw nodes since the root or the zoned node: (name, offset, size).
    raws: Vec<(&'a str, u64, u64)>,
    mark: Option<ZoneMark<'a>>,
    qcow2: Option<Qcow2Mark<'a>>,
}

impl<'a> GraphBuilder<'a> {
    pub(super) fn new(lbs: u32, num_queues: u32, read_only: bool) -> Self {
        GraphBuilder {
            lbs,
            num_queues,
            base: 0,
            window: None,
            read_only,
            stages: Vec::new(),
            imposed: Imposed::default(),
            raws: Vec::new(),
            mark: None,
            qcow2: None,
        }
    }

    /// A `qcow2` node: its image is opened at the leaf (its file, which
    /// must be the next node). Returns the file.
    pub(super) fn qcow2(
        &mut self,
        nodes: &HashMap<&str, &'a NodeSpec>,
        spec: &'a NodeSpec,
        q: &'a Qcow2Options,
    ) -> Result<&'a str, OpenError> {
        let name = spec.name.as_str();
        if let Some(m) = &self.mark {
            return Err(OpenError::inval(format!(
                "node {}: a zoned node over the qcow2 node {name} is not supported",
                m.name
            )));
        }
        self.read_only |= q.read_only;
        self.qcow2 = Some(qcow2::mark(nodes, spec, q, self.stages.len())?);
        Ok(q.file.as_str())
    }

    /// A `raw` node: a window into its child. Returns the child.
    pub(super) fn raw(&mut self, name: &'a str, raw: &'a RawOptions) -> Result<&'a str, OpenError> {
        if raw.offset % 512 != 0 || raw.size % 512 != 0 {
            return Err(OpenError::inval(format!(
                "node {name}: raw offset and size must be multiples of 512"
            )));
        }
        // `base`/`window` are in this node's coordinates; this node's own
        // size (if set) must contain them.
        if raw.size != 0 {
            let w = self.window.unwrap_or(raw.size.saturating_sub(self.base));
            if self.base.checked_add(w).is_none_or(|end| end > raw.size) || w == 0 {
                return Err(OpenError::inval(format!(
                    "node {name}: window of {w} bytes at {} does not fit its {} bytes",
                    self.base, raw.size
                )));
            }
            self.window = Some(w);
        }
        self.base = self
            .base
            .checked_add(raw.offset)
            .ok_or_else(|| OpenError::inval(format!("node {name}: offset overflows")))?;
        self.raws.push((name, raw.offset, raw.size));
        self.stages.push(Stage::Window { offset: raw.offset });
        Ok(raw.child.as_str())
    }

    /// A `zoned` node: its zone layer is built at the leaf (it needs the
    /// child's size). Returns the child.
    pub(super) fn zoned(
        &mut self,
        name: &'a str,
        z: &'a ZonedOptions,
    ) -> Result<&'a str, OpenError> {
        if let Some(m) = &self.mark {
            return Err(OpenError::inval(format!(
                "node {}: child {name} is zoned; a zoned node needs a regular child",
                m.name
            )));
        }
        // The windows above are in this node's coordinates; below it, they
        // start again from the child.
        self.mark = Some(ZoneMark {
            name,
            opts: z,
            stage: self.stages.len(),
            windows: ZoneWindows {
                raws: std::mem::take(&mut self.raws),
                base: self.base,
                window: self.window,
            },
        });
        self.base = 0;
        self.window = None;
        Ok(z.child.as_str())
    }

    /// A `throttle` node. Returns the child.
    pub(super) fn throttle(
        &mut self,
        name: &'a str,
        t: &'a ThrottleOptions,
    ) -> Result<&'a str, OpenError> {
        let limits = t
            .limits
            .ok_or_else(|| OpenError::inval(format!("node {name}: throttle without limits")))?;
        let buckets = if t.group.is_empty() {
            BucketSet::private()
        } else {
            BucketSet::group(&t.group)
                .map_err(|e| OpenError::new(Errno::EIO, format!("node {name}: {e}")))?
        };
        let throttle = Throttle::new(name, &limits, buckets);
        self.stages.push(Stage::Throttle(Arc::new(throttle)));
        Ok(t.child.as_str())
    }

    /// A `fault_injection` node: its rules, and the limits it imposes.
    /// Returns the child.
    pub(super) fn fault_injection(
        &mut self,
        name: &'a str,
        f: &'a FaultInjectionOptions,
    ) -> Result<&'a str, OpenError> {
        self.imposed.add(name, f)?;
        let seed = name.bytes().fold(0x9e37_79b9_7f4a_7c15u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
        self.stages
            .push(Stage::Faults(Arc::new(Faults::new(&f.rules, seed))));
        Ok(f.child.as_str())
    }

    /// A `null` leaf.
    pub(super) fn null(&self, name: &str, opts: &NullOptions) -> Result<LeafFound, OpenError> {
        if opts.size == 0 || opts.size % 512 != 0 {
            return Err(OpenError::inval(format!(
                "node {name}: null size must be a non-zero multiple of 512"
            )));
        }
        let lbs = self.lbs;
        Ok(LeafFound {
            leaf: Leaf::Null {
                latency: Duration::from_nanos(opts.latency_ns),
            },
            name: name.to_string(),
            file: None,
            path: String::new(),
            direct: false,
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
            read_only: self.read_only,
            discard_punches_holes: false,
            zoned: None,
        })
    }

    /// A libblkio leaf (io_uring, nvme-io_uring, virtio-blk-vhost-user,
    /// virtio-blk-vhost-vdpa), opened and started.
    pub(super) fn blkio(&self, name: &str, leaf: BlkioLeaf<'_>) -> Result<LeafFound, OpenError> {
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
        let mut read_only = self.read_only || leaf.read_only;
        let OpenedBlkio {
            blkio,
            file,
            pool,
            claim,
        } = open_blkio(name, &leaf, read_only, self.num_queues)?;
        read_only |= blkio.get_bool("read-only").unwrap_or(false);
        let dev_size = blkio
            .get_u64("capacity")
            .map_err(|e| OpenError::blkio(name, "capacity", e))?;
        let limits = blkio_limits(name, &blkio, self.lbs)?;
        Ok(LeafFound {
            leaf: Leaf::Blkio {
                driver: leaf.driver,
                blkio: Arc::new(Mutex::new(blkio)),
                pool,
                claim,
            },
            name: name.to_string(),
            file,
            path: leaf.path.to_string(),
            direct: leaf.direct.unwrap_or(false),
            dev_size,
            limits,
            read_only,
            discard_punches_holes: leaf.driver == "io_uring"
                && std::fs::metadata(leaf.path).is_ok_and(|m| m.is_file()),
            zoned: zoned_dev.map(|z| (leaf.path.to_string(), z)),
        })
    }

    /// The graph, once the walk found its leaf: the export's limits, and
    /// its zone layer if a zoned node or a zoned device is on the way.
    pub(super) fn finish(
        self,
        found: LeafFound,
        export: &VhostUserBlkExport,
    ) -> Result<OpenedGraph, OpenError> {
        let GraphBuilder {
            lbs,
            base,
            window,
            mut stages,
            imposed,
            raws,
            mark,
            qcow2,
            ..
        } = self;
        let mut limits = imposed.apply(found.limits);
        limits.read_only = found.read_only;
        let mut found = found;
        if let Some(q) = qcow2 {
            if found.zoned.is_some() {
                return Err(OpenError::inval(format!(
                    "node {}: a qcow2 image on a zoned device is not supported",
                    q.name
                )));
            }
            let file = found.file.take().ok_or_else(|| {
                OpenError::inval(format!("node {}: its file is not an io_uring node", q.name))
            })?;
            let stage = q.stage;
            let layer = qcow2::open(q, file, &found.path, !found.read_only, found.direct)?;
            // The export sees the image's virtual size.
            found.dev_size = layer.size();
            stages.insert(stage, Stage::Qcow2(Arc::new(layer)));
        }
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
                let layer = emulated_layer(m.name, m.opts, child_size, lbs, limits.max_transfer)?;
                stages.insert(m.stage, Stage::Zoned(Arc::clone(&layer)));
                Some(zone_access(
                    layer,
                    m.stage,
                    m.name,
                    &m.windows,
                    lbs,
                    &mut limits,
                )?)
            }
            (None, Some((path, sys))) => {
                // A zoned device passed through: its zones, whole ones only.
                let layer = device_layer(
                    &found.name,
                    path,
                    sys,
                    found.dev_size,
                    found.read_only,
                    lbs,
                    limits.max_transfer,
                )?;
                let stage = stages.len();
                stages.push(Stage::Zoned(Arc::clone(&layer)));
                let windows = ZoneWindows { raws, base, window };
                Some(zone_access(
                    layer,
                    stage,
                    &found.name,
                    &windows,
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
}

/// The GET_ID answer: the serial (or the export id), printable ASCII only,
/// NUL-padded to 20 bytes.
pub(super) fn serial(serial: &str, id: &str) -> [u8; 20] {
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
