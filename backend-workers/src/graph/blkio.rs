//! Opening a libblkio leaf: the driver instance, its claim on the device,
//! its queues, and the limits it reports.

use std::os::fd::{AsRawFd, IntoRawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use blkmesh_proto::ipc::v1::Limits;

use super::types::QueuePool;
use crate::errno::{Errno, OpenError};

/// How a libblkio leaf is opened.
pub(super) struct BlkioLeaf<'a> {
    pub driver: &'static str,
    pub path: &'a str,
    pub direct: Option<bool>,
    pub read_only: bool,
}

impl BlkioLeaf<'_> {
    /// Whether the worker opens the leaf itself, with a claim: the drivers
    /// whose requests the kernel runs on this process's behalf.
    fn claimed(&self) -> bool {
        matches!(self.driver, "io_uring" | "nvme-io_uring")
    }
}

/// A started libblkio instance.
pub(super) struct OpenedBlkio {
    pub blkio: blkio::Blkio,
    /// A second descriptor of the leaf the worker opened itself (the same
    /// open file, so the same claim), for a format node's metadata.
    pub file: Option<std::fs::File>,
    pub pool: Option<QueuePool>,
    pub claim: Option<Arc<crate::claim::LifeClaim>>,
}

pub(super) fn open_blkio(
    name: &str,
    leaf: &BlkioLeaf<'_>,
    read_only: bool,
    num_queues: u32,
) -> Result<OpenedBlkio, OpenError> {
    let path = leaf.path;
    let mut b =
        blkio::Blkio::new(leaf.driver).map_err(|e| OpenError::blkio(name, leaf.driver, e))?;
    let mut claim = None;
    let mut file = None;
    if leaf.claimed() {
        // Opened here, with this worker's claim on it, so that a
        // replacement can wait out its requests (crate::claim).
        let access = crate::claim::Access {
            // nvme-io_uring passthrough needs only read access.
            write: !read_only && leaf.driver == "io_uring",
            direct: leaf.direct.unwrap_or(false),
        };
        let (fd, life) = crate::claim::open(Path::new(path), access)
            .map_err(|e| OpenError::new(e.errno(), format!("node {name}: open {e}")))?;
        claim = Some(life);
        let dup = fd
            .try_clone()
            .map_err(|e| OpenError::new(Errno::of_io(&e), format!("node {name}: dup: {e}")))?;
        file = Some(std::fs::File::from(dup));
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
        file,
        pool,
        claim: claim.map(Arc::new),
    })
}

pub(super) fn blkio_limits(name: &str, b: &blkio::Blkio, lbs: u32) -> Result<Limits, OpenError> {
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
