//! The virtio-blk config space as a struct (`struct virtio_blk_config`,
//! virtio 1.3, 5.2.4), sent to the VMM with `as_slice()`.

use vm_memory::{ByteValued, Le16, Le32, Le64};

/// `struct virtio_blk_zoned_characteristics`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZonedCharacteristics {
    pub zone_sectors: Le32,
    pub max_open_zones: Le32,
    pub max_active_zones: Le32,
    pub max_append_sectors: Le32,
    pub write_granularity: Le32,
    /// `VIRTIO_BLK_Z_*`.
    pub model: u8,
    pub unused2: [u8; 3],
}

/// `struct virtio_blk_config`, up to the zoned characteristics: what the
/// device implements. Reads beyond it return zeroes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigSpace {
    /// In 512-byte sectors.
    pub capacity: Le64,
    pub size_max: Le32,
    pub seg_max: Le32,
    /// cylinders (16 bits), heads, sectors: unused.
    pub geometry: [u8; 4],
    pub blk_size: Le32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: Le16,
    pub opt_io_size: Le32,
    pub writeback: u8,
    pub unused0: u8,
    pub num_queues: Le16,
    pub max_discard_sectors: Le32,
    pub max_discard_seg: Le32,
    pub discard_sector_alignment: Le32,
    pub max_write_zeroes_sectors: Le32,
    pub max_write_zeroes_seg: Le32,
    pub write_zeroes_may_unmap: u8,
    pub unused1: [u8; 3],
    pub max_secure_erase_sectors: Le32,
    pub max_secure_erase_seg: Le32,
    pub secure_erase_sector_alignment: Le32,
    pub zoned: ZonedCharacteristics,
}

// SAFETY: `repr(C)` structs of little-endian integers and byte arrays
// only, every field at its natural alignment with no padding between or
// after them (4 × 5 + 1 + 3 = 24 bytes; 96 bytes, a multiple of the
// 8-byte alignment, as the layout test checks): every byte pattern is a
// valid value.
unsafe impl ByteValued for ZonedCharacteristics {}
// SAFETY: as above.
unsafe impl ByteValued for ConfigSpace {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn layout_is_virtio_blk_config() {
        assert_eq!(size_of::<ZonedCharacteristics>(), 24);
        assert_eq!(size_of::<ConfigSpace>(), 96);
        assert_eq!(offset_of!(ConfigSpace, blk_size), 20);
        assert_eq!(offset_of!(ConfigSpace, writeback), 32);
        assert_eq!(offset_of!(ConfigSpace, num_queues), 34);
        assert_eq!(offset_of!(ConfigSpace, write_zeroes_may_unmap), 56);
        assert_eq!(offset_of!(ConfigSpace, max_secure_erase_sectors), 60);
        assert_eq!(offset_of!(ConfigSpace, zoned), 72);
        assert_eq!(
            offset_of!(ConfigSpace, zoned) + offset_of!(ZonedCharacteristics, model),
            92
        );
    }
}
