//! Opening an export's node graph.
//!
//! The plan names a root node and carries its whole subtree. Opening walks it
//! from the root: format nodes (`raw`) narrow a byte window, and the protocol
//! leaf (`io_uring` through libblkio, or `null`) does the I/O. Limits propagate
//! from the leaf up to the export, as QEMU's refresh_limits does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blkmesh_ipc::buckets::BucketSet;
use blkmesh_proto::ipc::v1::Limits;
use blkmesh_proto::v1::{node_spec::Driver, ExportPlan, NodeSpec};

use crate::stages::{Faults, Stage, Throttle};

/// Deepest graph accepted (guards against cycles in a hostile plan).
const MAX_DEPTH: usize = 16;

/// Why a graph could not be opened: an errno for the frontend plus a message.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct OpenError {
    pub errno: i32,
    pub message: String,
}

impl OpenError {
    fn inval(message: impl Into<String>) -> Self {
        OpenError {
            errno: libc::EINVAL,
            message: message.into(),
        }
    }

    fn blkio(node: &str, what: &str, e: blkio::Error) -> Self {
        OpenError {
            errno: e.errno().raw_os_error(),
            message: format!("node {node}: {what}: {}", e.message()),
        }
    }
}

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
}

impl OpenedGraph {
    pub fn read_only(&self) -> bool {
        self.limits.read_only
    }
}

/// How a libblkio leaf is opened.
struct BlkioLeaf<'a> {
    driver: &'static str,
    path: &'a str,
    direct: Option<bool>,
    read_only: bool,
}

/// Opens the plan's graph.
pub fn open(plan: &ExportPlan) -> Result<OpenedGraph, OpenError> {
    let export = plan
        .export
        .as_ref()
        .ok_or_else(|| OpenError::inval("plan has no export"))?;
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
                stages.push(Stage::Window { offset: raw.offset });
                name = raw.child.as_str();
                continue;
            }
            Some(Driver::Throttle(t)) => {
                let limits = t.limits.ok_or_else(|| {
                    OpenError::inval(format!("node {name}: throttle without limits"))
                })?;
                let buckets = if t.group.is_empty() {
                    BucketSet::private()
                } else {
                    BucketSet::group(&t.group).map_err(|e| OpenError {
                        errno: libc::EIO,
                        message: format!("node {name}: {e}"),
                    })?
                };
                stages.push(Stage::Throttle(Arc::new(Throttle::new(
                    name, &limits, buckets,
                ))));
                name = t.child.as_str();
                continue;
            }
            Some(Driver::FaultInjection(f)) => {
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
                let size = fit_window(name, opts.size, base, window, lbs)?;
                return Ok(OpenedGraph {
                    leaf: Leaf::Null {
                        latency: Duration::from_nanos(opts.latency_ns),
                    },
                    stages,
                    limits: Limits {
                        size,
                        logical_block_size: lbs,
                        physical_block_size: lbs,
                        request_alignment: 1,
                        buf_alignment: 1,
                        optimal_io_size: 0,
                        max_transfer: 0,
                        max_segments: 0,
                        max_discard: u32::MAX as u64 * 512,
                        max_write_zeroes: u32::MAX as u64 * 512,
                        read_only,
                    },
                    serial: serial(&export.serial, &export.id),
                    discard_punches_holes: false,
                    root_node: export.node.clone(),
                    leaf_node: name.to_string(),
                });
            }
            None => return Err(OpenError::inval(format!("node {name} has no driver"))),
        };
        // A libblkio protocol leaf.
        read_only |= leaf.read_only;
        let (blkio, pool) = open_blkio(name, &leaf, read_only, num_queues)?;
        read_only |= blkio.get_bool("read-only").unwrap_or(false);
        let dev_size = blkio
            .get_u64("capacity")
            .map_err(|e| OpenError::blkio(name, "capacity", e))?;
        let limits = blkio_limits(name, &blkio, lbs)?;
        let size = fit_window(name, dev_size, base, window, lbs)?;
        return Ok(OpenedGraph {
            leaf: Leaf::Blkio {
                driver: leaf.driver,
                blkio: Arc::new(Mutex::new(blkio)),
                pool,
            },
            stages,
            limits: Limits {
                size,
                read_only,
                ..limits
            },
            serial: serial(&export.serial, &export.id),
            discard_punches_holes: leaf.driver == "io_uring"
                && std::fs::metadata(leaf.path).is_ok_and(|m| m.is_file()),
            root_node: export.node.clone(),
            leaf_node: name.to_string(),
        });
    }
    Err(OpenError::inval("graph deeper than 16 nodes (a cycle?)"))
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

fn open_blkio(
    name: &str,
    leaf: &BlkioLeaf<'_>,
    read_only: bool,
    num_queues: u32,
) -> Result<(blkio::Blkio, Option<QueuePool>), OpenError> {
    let path = leaf.path;
    let mut b =
        blkio::Blkio::new(leaf.driver).map_err(|e| OpenError::blkio(name, leaf.driver, e))?;
    b.set_str("path", path)
        .map_err(|e| OpenError::blkio(name, "path", e))?;
    if let Some(direct) = leaf.direct {
        b.set_bool("direct", direct)
            .map_err(|e| OpenError::blkio(name, "direct", e))?;
    }
    b.set_bool("read-only", read_only)
        .map_err(|e| OpenError::blkio(name, "read-only", e))?;
    b.connect()
        .map_err(|e| OpenError::blkio(name, &format!("open {path}"), e))?;
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
    let started = b.start().map_err(|e| OpenError::blkio(name, "start", e))?;
    let pool = (!can_add).then(|| Arc::new(Mutex::new(started.queues)));
    Ok((b, pool))
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
        buf_alignment: get_i32("buf-alignment")?.max(1) as u32,
        optimal_io_size: get_i32("optimal-io-size").unwrap_or(0).max(0) as u32,
        max_transfer: get_i32("max-transfer").unwrap_or(0).max(0) as u64,
        max_segments: get_i32("max-segments").unwrap_or(0).max(0) as u32,
        max_discard: unlimited(get_u64("max-discard-len").unwrap_or(0)),
        max_write_zeroes: unlimited(get_u64("max-write-zeroes-len").unwrap_or(0)),
        read_only: false,
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
mod tests {
    use super::*;
    use blkmesh_proto::v1::{IoUringOptions, NullOptions, RawOptions, VhostUserBlkExport};

    fn plan(root: &str, nodes: Vec<NodeSpec>, writable: bool) -> ExportPlan {
        ExportPlan {
            export: Some(VhostUserBlkExport {
                id: "e".into(),
                node: root.into(),
                socket: "/tmp/x".into(),
                writable,
                ..Default::default()
            }),
            nodes,
            queues: vec![],
        }
    }

    fn null(name: &str, size: u64) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            driver: Some(Driver::Null(NullOptions {
                size,
                latency_ns: 0,
            })),
        }
    }

    fn raw(name: &str, child: &str, offset: u64, size: u64) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            driver: Some(Driver::Raw(RawOptions {
                child: child.into(),
                offset,
                size,
            })),
        }
    }

    #[test]
    fn raw_windows_compose() {
        let g = open(&plan(
            "outer",
            vec![
                raw("outer", "inner", 4096, 8192),
                raw("inner", "n", 1 << 20, 0),
                null("n", 4 << 20),
            ],
            true,
        ))
        .unwrap();
        let shift: u64 = g
            .stages
            .iter()
            .map(|s| match s {
                Stage::Window { offset } => *offset,
                _ => 0,
            })
            .sum();
        assert_eq!(shift, (1 << 20) + 4096);
        assert_eq!(g.limits.size, 8192);
        assert!(!g.read_only());
    }

    #[test]
    fn rejects_window_larger_than_child() {
        let e = open(&plan(
            "r",
            vec![raw("r", "n", 0, 1 << 30), null("n", 1 << 20)],
            true,
        ))
        .unwrap_err();
        assert_eq!(e.errno, libc::EINVAL);
    }

    #[test]
    fn rejects_cycles() {
        let e = open(&plan(
            "a",
            vec![raw("a", "b", 0, 0), raw("b", "a", 0, 0)],
            true,
        ))
        .unwrap_err();
        assert!(e.message.contains("cycle"), "{}", e.message);
    }

    #[test]
    fn rejects_missing_node() {
        assert!(open(&plan("a", vec![raw("a", "zz", 0, 0)], true)).is_err());
    }

    #[test]
    fn io_uring_reports_file_size_and_read_only() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(3 << 20).unwrap();
        let n = NodeSpec {
            name: "f".into(),
            driver: Some(Driver::IoUring(IoUringOptions {
                path: f.path().display().to_string(),
                direct: false,
                read_only: true,
            })),
        };
        let g = open(&plan("f", vec![n], false)).unwrap();
        assert_eq!(g.limits.size, 3 << 20);
        assert!(g.read_only());
    }

    #[test]
    fn io_uring_missing_file_is_enoent() {
        let n = NodeSpec {
            name: "f".into(),
            driver: Some(Driver::IoUring(IoUringOptions {
                path: "/nonexistent/blkmesh.img".into(),
                direct: false,
                read_only: false,
            })),
        };
        let e = open(&plan("f", vec![n], true)).unwrap_err();
        assert_eq!(e.errno, libc::ENOENT, "{}", e.message);
    }

    #[test]
    fn serial_is_padded_and_printable() {
        assert_eq!(&serial("", "disk0")[..6], b"disk0\0");
        assert_eq!(serial("a\u{1}b", "x")[..3], *b"ab\0");
    }
}
