//! virtio-blk feature bits and configuration space, derived from the
//! export's settings and the limits its graph reports.

use blkmesh_proto::ipc::v1::Limits;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Ring segments per request; the guest is offered two less (QEMU's rule of
/// thumb) so a descriptor split at a region boundary still fits.
pub const RING_MAX_SEGMENTS: u32 = 128;
/// Largest single segment we offer (size_max).
const SIZE_MAX: u32 = 1 << 20;
/// Bytes of the virtio-blk config space we expose (up to the zoned fields).
pub const CONFIG_SIZE: usize = 96;

/// The export as the device presents it.
#[derive(Clone, Debug)]
pub struct BlkConfig {
    pub num_queues: u16,
    pub queue_size: u16,
    pub logical_block_size: u32,
    pub writable: bool,
    pub limits: Limits,
}

impl BlkConfig {
    pub fn seg_max(&self) -> u32 {
        let l = self.limits.max_segments;
        let ring = RING_MAX_SEGMENTS - 2;
        if l == 0 {
            ring
        } else {
            l.min(ring)
        }
    }

    fn sectors(bytes: u64) -> u32 {
        (bytes / 512).min(u32::MAX as u64) as u32
    }

    pub fn max_discard_sectors(&self) -> u32 {
        Self::sectors(self.limits.max_discard)
    }

    pub fn max_write_zeroes_sectors(&self) -> u32 {
        Self::sectors(self.limits.max_write_zeroes)
    }

    pub fn read_only(&self) -> bool {
        !self.writable || self.limits.read_only
    }

    /// Device feature bits.
    pub fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_MQ;
        if self.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            if self.max_discard_sectors() > 0 {
                f |= 1 << VIRTIO_BLK_F_DISCARD;
            }
            if self.max_write_zeroes_sectors() > 0 {
                f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
            }
        }
        f
    }

    /// The config space (struct virtio_blk_config, little-endian).
    pub fn config_space(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        let put32 = |c: &mut [u8; CONFIG_SIZE], at: usize, v: u32| {
            c[at..at + 4].copy_from_slice(&v.to_le_bytes())
        };
        let lbs = self.logical_block_size.max(512);
        c[0..8].copy_from_slice(&(self.limits.size / 512).to_le_bytes()); // capacity
        let size_max = match self.limits.max_transfer {
            0 => SIZE_MAX,
            t => (t.min(SIZE_MAX as u64)) as u32,
        };
        put32(&mut c, 8, size_max);
        put32(&mut c, 12, self.seg_max());
        // 16..20: geometry, unused.
        put32(&mut c, 20, lbs);
        // Topology: physical block exponent, alignment offset, min io (in
        // logical blocks), optimal io (in logical blocks).
        let phys = self.limits.physical_block_size.max(lbs);
        c[24] = (phys / lbs).trailing_zeros() as u8;
        c[25] = 0;
        c[26..28].copy_from_slice(&1u16.to_le_bytes());
        put32(&mut c, 28, self.limits.optimal_io_size / lbs);
        c[32] = 1; // writeback: the guest must flush
        c[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        put32(&mut c, 36, self.max_discard_sectors());
        put32(&mut c, 40, 1); // max_discard_seg
        put32(&mut c, 44, lbs / 512); // discard_sector_alignment
        put32(&mut c, 48, self.max_write_zeroes_sectors());
        put32(&mut c, 52, 1); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BlkConfig {
        BlkConfig {
            num_queues: 4,
            queue_size: 256,
            logical_block_size: 4096,
            writable: true,
            limits: Limits {
                size: 1 << 30,
                logical_block_size: 4096,
                physical_block_size: 4096,
                optimal_io_size: 65536,
                max_discard: 1 << 30,
                max_write_zeroes: 1 << 30,
                ..Default::default()
            },
        }
    }

    #[test]
    fn config_space_fields_land_at_spec_offsets() {
        let c = cfg().config_space();
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u32::from_le_bytes(c[28..32].try_into().unwrap()), 16);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(
            u32::from_le_bytes(c[36..40].try_into().unwrap()),
            (1 << 30) / 512
        );
    }

    #[test]
    fn read_only_export_offers_ro_and_no_discard() {
        let mut c = cfg();
        c.writable = false;
        let f = c.features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
    }
}
