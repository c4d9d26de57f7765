//! The libblkio instance a device, its queues and its buffers share.

use blkio::{Blkio, MemoryRegion};

/// The libblkio driver blkmesh-io drives.
pub(super) const DRIVER: &str = "virtio-blk-vhost-user";

/// State shared by the device, its queues and its buffers.
pub(super) struct Shared {
    pub(super) blkio: Blkio,
    /// The mapped buffer region; allocated by `blkio`, which frees it only
    /// once `blkio` and every `Blkioq` are gone.
    pub(super) region: MemoryRegion,
    pub(super) buf_alignment: usize,
}
