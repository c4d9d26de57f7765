//! What requests are checked against: the device's size, writability and
//! limits, and its zone geometry.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};

/// Bytes of a sector, the unit of request offsets whatever the block size.
pub(super) const SECTOR: u64 = 512;
/// Bytes of a GET_ID answer.
pub const ID_BYTES: usize = 20;
pub use crate::config::MAX_REQUEST_BYTES;

/// What the device offers, for request checks. The atomics change when
/// the graph is reopened (resize, read-only switch); the queue threads are
/// drained and paused around such a change, so relaxed loads suffice.
#[derive(Debug)]
pub struct DeviceInfo {
    /// Bytes.
    pub capacity: AtomicU64,
    pub writable: AtomicBool,
    pub max_discard_sectors: AtomicU32,
    pub max_write_zeroes_sectors: AtomicU32,
    /// Most ring segments one request may use.
    pub max_segments: usize,
    pub serial: [u8; ID_BYTES],
    /// Per-queue statistics, kept for the export's lifetime so counts
    /// survive VMM reconnects.
    pub stats: Vec<std::sync::Arc<blkmesh_stats::IoCounters>>,
}

/// Bytes of a zone report's header (`struct virtio_blk_zone_report`
/// without its descriptors); a report buffer must hold at least this.
pub const ZONE_REPORT_HEADER: u64 = 64;
/// Bytes of the `append_sector` field a zone append returns before its
/// status byte.
pub const APPEND_SECTOR_BYTES: u64 = 8;

/// The zone geometry requests are checked against, for an export whose
/// graph is zoned. Separate from [`DeviceInfo`] because zone requests are
/// only taken on connections that negotiated VIRTIO_BLK_F_ZONED (see
/// [`parse_with_zones`]); atomics for the same reason as there (reopen).
#[derive(Debug, Default)]
pub struct ZoneLimits {
    /// Zone size in bytes; 0 = not zoned (zone requests are refused).
    pub zone_size: AtomicU64,
    /// `max_append_sectors` as offered (0 = appends not supported).
    pub max_append_sectors: AtomicU32,
}

impl ZoneLimits {
    /// What the device offers for `cfg`.
    pub fn update(&self, cfg: &crate::config::BlkConfig) {
        self.zone_size.store(cfg.zone_size(), Relaxed);
        self.max_append_sectors
            .store(cfg.max_append_sectors(), Relaxed);
    }
}
