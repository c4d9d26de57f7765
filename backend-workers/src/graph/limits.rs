//! The export's limits: what the nodes above the leaf impose on it, and
//! the window the export is.

use blkmesh_proto::ipc::v1::Limits;
use blkmesh_proto::v1::FaultInjectionOptions;

use crate::errno::OpenError;
use crate::split::min_nonzero;

/// Limits the nodes above the leaf impose (the blkdebug-style knobs of
/// fault-injection nodes), merged into the leaf's as QEMU's refresh_limits
/// does: the strictest wins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Imposed {
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
    pub(super) fn add(&mut self, name: &str, f: &FaultInjectionOptions) -> Result<(), OpenError> {
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
    pub(super) fn apply(&self, leaf: Limits) -> Limits {
        Limits {
            max_transfer: min_nonzero(leaf.max_transfer, self.max_transfer),
            max_segments: min_nonzero(leaf.max_segments, self.max_segments),
            buf_alignment: leaf.buf_alignment.max(self.buf_alignment).max(1),
            ..leaf
        }
    }
}

/// Size of the export: what is left of the leaf after `base`, bounded by the
/// window, rounded down to the logical block size.
pub(super) fn fit_window(
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
