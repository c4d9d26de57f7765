//! virtio-blk status bytes and their names.

/// Status `VIRTIO_BLK_S_OK`.
pub const S_OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
/// Status `VIRTIO_BLK_S_IOERR`.
pub const S_IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
/// Status `VIRTIO_BLK_S_UNSUPP`.
pub const S_UNSUPP: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;
/// What a status byte holds before the device writes it: a value no
/// device answers, so an untouched status is visible.
pub const STATUS_UNTOUCHED: u8 = 0xff;

/// Status `VIRTIO_BLK_S_ZONE_INVALID_CMD`: the zone's type or condition
/// forbids the request, or its address or size is wrong for the zone.
pub const S_ZONE_INVALID_CMD: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_ZONE_INVALID_CMD as u8;
/// Status `VIRTIO_BLK_S_ZONE_UNALIGNED_WP`: a write not at the write
/// pointer (or not a multiple of the write granularity).
pub const S_ZONE_UNALIGNED_WP: u8 =
    virtio_bindings::virtio_blk::VIRTIO_BLK_S_ZONE_UNALIGNED_WP as u8;
/// Status `VIRTIO_BLK_S_ZONE_OPEN_RESOURCE`: too many open zones.
pub const S_ZONE_OPEN_RESOURCE: u8 =
    virtio_bindings::virtio_blk::VIRTIO_BLK_S_ZONE_OPEN_RESOURCE as u8;
/// Status `VIRTIO_BLK_S_ZONE_ACTIVE_RESOURCE`: too many active zones.
pub const S_ZONE_ACTIVE_RESOURCE: u8 =
    virtio_bindings::virtio_blk::VIRTIO_BLK_S_ZONE_ACTIVE_RESOURCE as u8;

/// The name of a virtio-blk status byte: `OK`, `IOERR`, `UNSUPP`,
/// `ZONE_INVALID_CMD`, ... or `unknown`.
pub fn status_name(status: u8) -> &'static str {
    match status {
        S_OK => "OK",
        S_IOERR => "IOERR",
        S_UNSUPP => "UNSUPP",
        S_ZONE_INVALID_CMD => "ZONE_INVALID_CMD",
        S_ZONE_UNALIGNED_WP => "ZONE_UNALIGNED_WP",
        S_ZONE_OPEN_RESOURCE => "ZONE_OPEN_RESOURCE",
        S_ZONE_ACTIVE_RESOURCE => "ZONE_ACTIVE_RESOURCE",
        STATUS_UNTOUCHED => "not written by the device",
        _ => "unknown",
    }
}
