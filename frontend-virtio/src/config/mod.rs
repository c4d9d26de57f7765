//! virtio-blk feature bits and configuration space, derived from the
//! export's settings and the limits its graph reports.

use blkmesh_proto::ipc::v1::Limits;
use blkmesh_proto::v1::ZoneModel;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_F_ZONED, VIRTIO_BLK_Z_HA, VIRTIO_BLK_Z_HM,
    VIRTIO_BLK_Z_NONE,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

mod space;

pub use space::{ConfigSpace, ZonedCharacteristics};

/// Ring segments per request; the guest is offered two less (QEMU's rule of
/// thumb) so a descriptor split at a region boundary still fits.
pub const RING_MAX_SEGMENTS: u32 = 128;
/// Largest single segment we offer (size_max).
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest data request taken: seg_max × size_max as the device offers
/// them (ring segments × the largest segment).
pub const MAX_REQUEST_BYTES: u64 = RING_MAX_SEGMENTS as u64 * SIZE_MAX as u64;
/// Bytes of the virtio-blk config space we expose (up to the zoned fields).
pub const CONFIG_SIZE: usize = std::mem::size_of::<ConfigSpace>();
/// Where the zoned characteristics start in the config space
/// (`struct virtio_blk_zoned_characteristics`, 24 bytes).
pub const ZONED_OFFSET: usize = std::mem::offset_of!(ConfigSpace, zoned);

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

    /// The virtio zoned model of the graph: `VIRTIO_BLK_Z_HM`,
    /// `VIRTIO_BLK_Z_HA`, or `VIRTIO_BLK_Z_NONE` (not zoned, or a zone size
    /// that cannot be expressed in the config space). Note that the proto
    /// enum and virtio number the two models the other way round.
    pub fn zoned_model(&self) -> u8 {
        let Some(z) = self.limits.zones.as_ref() else {
            return VIRTIO_BLK_Z_NONE as u8;
        };
        let sectors = z.zone_size / 512;
        if z.zone_size % 512 != 0 || sectors == 0 || sectors > u32::MAX as u64 {
            return VIRTIO_BLK_Z_NONE as u8;
        }
        match ZoneModel::try_from(z.model) {
            Ok(ZoneModel::HostManaged) => VIRTIO_BLK_Z_HM as u8,
            Ok(ZoneModel::HostAware) => VIRTIO_BLK_Z_HA as u8,
            _ => VIRTIO_BLK_Z_NONE as u8,
        }
    }

    /// Whether the device offers VIRTIO_BLK_F_ZONED.
    pub fn is_zoned(&self) -> bool {
        self.zoned_model() != VIRTIO_BLK_Z_NONE as u8
    }

    /// Zone size in bytes, 0 when not zoned.
    pub fn zone_size(&self) -> u64 {
        match (&self.limits.zones, self.is_zoned()) {
            (Some(z), true) => z.zone_size,
            _ => 0,
        }
    }

    /// `max_append_sectors`: the graph's largest append, bounded by what
    /// one request may carry (seg_max × size_max as offered, and the
    /// frontend's own bound) and by the zone size; 0 when appends are not
    /// supported (or not zoned).
    pub fn max_append_sectors(&self) -> u32 {
        let Some(z) = self.limits.zones.as_ref().filter(|_| self.is_zoned()) else {
            return 0;
        };
        let bytes = z
            .max_append
            .min(self.seg_max() as u64 * SIZE_MAX as u64)
            .min(MAX_REQUEST_BYTES)
            .min(z.zone_size);
        Self::sectors(bytes)
    }

    /// `write_granularity` in bytes: the graph's, or the logical block
    /// size when it gives none (Linux refuses a zoned device reporting 0).
    pub fn write_granularity(&self) -> u32 {
        let lbs = self.logical_block_size.max(512);
        match self.limits.zones.as_ref() {
            Some(z) if z.write_granularity != 0 => z.write_granularity.max(lbs),
            _ => lbs,
        }
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
        let model = self.zoned_model();
        if model != VIRTIO_BLK_Z_NONE as u8 {
            f |= 1 << VIRTIO_BLK_F_ZONED;
        }
        if self.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            // A driver must not negotiate DISCARD with a host-managed
            // device (virtio 1.3, 5.2.5.1): do not offer it.
            if self.max_discard_sectors() > 0 && model != VIRTIO_BLK_Z_HM as u8 {
                f |= 1 << VIRTIO_BLK_F_DISCARD;
            }
            if self.max_write_zeroes_sectors() > 0 {
                f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
            }
        }
        f
    }

    /// The config space (struct virtio_blk_config, little-endian).
    pub fn config_space(&self) -> ConfigSpace {
        let lbs = self.logical_block_size.max(512);
        let size_max = match self.limits.max_transfer {
            0 => SIZE_MAX,
            t => (t.min(SIZE_MAX as u64)) as u32,
        };
        // Topology: physical block exponent, alignment offset, min io (in
        // logical blocks), optimal io (in logical blocks).
        let phys = self.limits.physical_block_size.max(lbs);
        let zoned = if self.is_zoned() {
            let zi = self.limits.zones.unwrap_or_default();
            ZonedCharacteristics {
                zone_sectors: Self::sectors(zi.zone_size).into(),
                max_open_zones: zi.max_open_zones.into(),
                max_active_zones: zi.max_active_zones.into(),
                max_append_sectors: self.max_append_sectors().into(),
                write_granularity: self.write_granularity().into(),
                model: self.zoned_model(),
                unused2: [0; 3],
            }
        } else {
            ZonedCharacteristics::default()
        };
        ConfigSpace {
            capacity: (self.limits.size / 512).into(),
            size_max: size_max.into(),
            seg_max: self.seg_max().into(),
            blk_size: lbs.into(),
            physical_block_exp: (phys / lbs).trailing_zeros() as u8,
            alignment_offset: 0,
            min_io_size: 1.into(),
            opt_io_size: (self.limits.optimal_io_size / lbs).into(),
            // The guest must flush.
            writeback: 1,
            num_queues: self.num_queues.into(),
            max_discard_sectors: self.max_discard_sectors().into(),
            max_discard_seg: 1.into(),
            discard_sector_alignment: (lbs / 512).into(),
            max_write_zeroes_sectors: self.max_write_zeroes_sectors().into(),
            max_write_zeroes_seg: 1.into(),
            write_zeroes_may_unmap: 1,
            // Secure erase is not offered; geometry is unused.
            zoned,
            ..ConfigSpace::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::ByteValued;

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
        let c = cfg().config_space().as_slice().to_vec();
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

    fn zoned(model: ZoneModel) -> BlkConfig {
        let mut c = cfg();
        c.limits.zones = Some(blkmesh_proto::v1::ZoneInfo {
            model: model as i32,
            zone_size: 256 << 10,
            zone_capacity: 192 << 10,
            nr_zones: 4096,
            max_open_zones: 8,
            max_active_zones: 12,
            write_granularity: 0,
            max_append: 4 << 20,
        });
        c
    }

    #[test]
    fn zoned_characteristics_land_at_offset_72() {
        let c = zoned(ZoneModel::HostManaged);
        assert_ne!(c.features() & (1 << VIRTIO_BLK_F_ZONED), 0);
        // DISCARD is not offered with the host-managed model.
        assert_eq!(c.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(c.features() & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        let s = c.config_space().as_slice().to_vec();
        let u32_at = |at: usize| u32::from_le_bytes(s[at..at + 4].try_into().unwrap());
        assert_eq!(u32_at(72), 512); // zone_sectors
        assert_eq!(u32_at(76), 8); // max_open_zones
        assert_eq!(u32_at(80), 12); // max_active_zones
                                    // max_append_sectors: bounded by the zone size (256 KiB).
        assert_eq!(u32_at(84), 512);
        // write_granularity: the logical block size when the graph has none.
        assert_eq!(u32_at(88), 4096);
        assert_eq!(s[92], VIRTIO_BLK_Z_HM as u8);
        assert_eq!(&s[93..96], &[0, 0, 0]);
    }

    #[test]
    fn zone_models_map_to_virtio_numbers() {
        // The proto numbers HOST_AWARE 1 and HOST_MANAGED 2; virtio the
        // other way round.
        let ha = zoned(ZoneModel::HostAware);
        assert_eq!(ha.zoned_model(), VIRTIO_BLK_Z_HA as u8);
        assert_eq!(ha.config_space().as_slice().to_vec()[92], 2);
        assert_ne!(ha.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(
            zoned(ZoneModel::HostManaged)
                .config_space()
                .as_slice()
                .to_vec()[92],
            1
        );
        let none = zoned(ZoneModel::None);
        assert!(!none.is_zoned());
        assert_eq!(none.features() & (1 << VIRTIO_BLK_F_ZONED), 0);
        assert_eq!(&none.config_space().as_slice().to_vec()[72..96], &[0u8; 24]);
        // Not zoned at all: nothing past the write-zeroes fields.
        let plain = cfg();
        assert_eq!(plain.features() & (1 << VIRTIO_BLK_F_ZONED), 0);
        assert_eq!(
            &plain.config_space().as_slice().to_vec()[57..96],
            &[0u8; 39]
        );
    }

    #[test]
    fn max_append_is_bounded_by_what_a_request_carries() {
        let mut c = zoned(ZoneModel::HostManaged);
        if let Some(z) = c.limits.zones.as_mut() {
            z.zone_size = 1 << 30;
            z.max_append = 1 << 40;
            z.write_granularity = 8192;
        }
        // seg_max 126 × size_max 1 MiB.
        assert_eq!(c.max_append_sectors(), 126 * 2048);
        assert_eq!(c.write_granularity(), 8192);
        if let Some(z) = c.limits.zones.as_mut() {
            z.max_append = 0;
        }
        assert_eq!(c.max_append_sectors(), 0);
        // A zone size that is not whole sectors is not offered as zoned.
        if let Some(z) = c.limits.zones.as_mut() {
            z.zone_size = 1000;
        }
        assert!(!c.is_zoned());
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
