//! What an opened graph is, for the queues and the control channel.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use blkmesh_proto::ipc::v1::Limits;
use blkmesh_proto::v1::ZoneInfo;

use crate::stages::Stage;
use crate::zoned::ZoneLayer;

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

    /// The graph's qcow2 node, if it has one (at most one: its file is
    /// the leaf).
    pub fn qcow2(&self) -> Option<&Arc<crate::qcow2::Qcow2Layer>> {
        self.stages.iter().find_map(|s| match s {
            Stage::Qcow2(layer) => Some(layer),
            _ => None,
        })
    }
}
