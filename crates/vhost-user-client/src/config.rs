//! The virtio-blk configuration space (`struct virtio_blk_config`,
//! virtio 1.2 section 5.2.4), as read with GET_CONFIG.

/// Bytes of the config space up to and including the zoned fields.
pub const CONFIG_SIZE: usize = 96;

/// The fields of the virtio-blk config space. Fields the device does not
/// offer (feature bit off) read as whatever the device put there, usually
/// zero.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment in bytes (`SIZE_MAX`).
    pub size_max: u32,
    /// Most segments per request (`SEG_MAX`).
    pub seg_max: u32,
    /// Logical block size (`BLK_SIZE`).
    pub blk_size: u32,
    /// log2(physical block / logical block) (`TOPOLOGY`).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block (`TOPOLOGY`).
    pub alignment_offset: u8,
    /// Minimum I/O size in logical blocks (`TOPOLOGY`).
    pub min_io_size: u16,
    /// Optimal I/O size in logical blocks (`TOPOLOGY`).
    pub opt_io_size: u32,
    /// Cache mode: 1 writeback, 0 writethrough (`CONFIG_WCE`).
    pub writeback: u8,
    /// Number of queues (`MQ`).
    pub num_queues: u16,
    /// Largest discard in sectors (`DISCARD`).
    pub max_discard_sectors: u32,
    /// Most discard ranges per request.
    pub max_discard_seg: u32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes in sectors (`WRITE_ZEROES`).
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes ranges per request.
    pub max_write_zeroes_seg: u32,
    /// Whether write-zeroes may deallocate.
    pub write_zeroes_may_unmap: u8,
    /// Largest secure erase in sectors (`SECURE_ERASE`).
    pub max_secure_erase_sectors: u32,
    /// Most secure-erase ranges per request.
    pub max_secure_erase_seg: u32,
    /// Secure-erase alignment in sectors.
    pub secure_erase_sector_alignment: u32,
    /// Zone size in sectors (`ZONED`).
    pub zone_sectors: u32,
    /// Most open zones.
    pub max_open_zones: u32,
    /// Most active zones.
    pub max_active_zones: u32,
    /// Largest zone append in sectors.
    pub max_append_sectors: u32,
    /// Write granularity in bytes.
    pub write_granularity: u32,
    /// Zoned model: 0 none, 1 host-managed, 2 host-aware.
    pub zoned_model: u8,
    /// The bytes as read (may be shorter than [`CONFIG_SIZE`]).
    pub raw: Vec<u8>,
}

impl BlkConfig {
    /// Parses the config space; missing bytes read as zero.
    pub fn parse(bytes: &[u8]) -> BlkConfig {
        let mut b = [0u8; CONFIG_SIZE];
        let n = bytes.len().min(CONFIG_SIZE);
        b[..n].copy_from_slice(&bytes[..n]);
        let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let mut cap = [0u8; 8];
        cap.copy_from_slice(&b[0..8]);
        BlkConfig {
            capacity: u64::from_le_bytes(cap),
            size_max: u32_at(8),
            seg_max: u32_at(12),
            // 16..20: geometry (legacy).
            blk_size: u32_at(20),
            physical_block_exp: b[24],
            alignment_offset: b[25],
            min_io_size: u16_at(26),
            opt_io_size: u32_at(28),
            writeback: b[32],
            num_queues: u16_at(34),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: b[56],
            max_secure_erase_sectors: u32_at(60),
            max_secure_erase_seg: u32_at(64),
            secure_erase_sector_alignment: u32_at(68),
            zone_sectors: u32_at(72),
            max_open_zones: u32_at(76),
            max_active_zones: u32_at(80),
            max_append_sectors: u32_at(84),
            write_granularity: u32_at(88),
            zoned_model: b[92],
            raw: bytes.to_vec(),
        }
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity.saturating_mul(512)
    }

    /// Whether the config space describes a zoned device (host-managed or
    /// host-aware with a zone size). Meaningful only when ZONED was
    /// offered; the device zeroes the fields for a driver that did not
    /// accept it.
    pub fn is_zoned(&self) -> bool {
        matches!(self.zoned_model, crate::zone::Z_HM | crate::zone::Z_HA) && self.zone_sectors > 0
    }

    /// Zone size in bytes (`zone_sectors` × 512).
    pub fn zone_bytes(&self) -> u64 {
        self.zone_sectors as u64 * 512
    }

    /// Number of zones: the last one may be smaller (virtio 1.3, 5.2.5.1).
    pub fn nr_zones(&self) -> u64 {
        match self.zone_sectors {
            0 => 0,
            z => self.capacity.div_ceil(z as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_come_from_spec_offsets() {
        let mut c = [0u8; CONFIG_SIZE];
        c[0..8].copy_from_slice(&2048u64.to_le_bytes());
        c[12..16].copy_from_slice(&126u32.to_le_bytes());
        c[20..24].copy_from_slice(&4096u32.to_le_bytes());
        c[24] = 3;
        c[34..36].copy_from_slice(&4u16.to_le_bytes());
        c[36..40].copy_from_slice(&65536u32.to_le_bytes());
        c[56] = 1;
        c[72..76].copy_from_slice(&524288u32.to_le_bytes());
        c[92] = 1;
        let p = BlkConfig::parse(&c);
        assert_eq!(p.capacity, 2048);
        assert_eq!(p.capacity_bytes(), 1 << 20);
        assert_eq!(p.seg_max, 126);
        assert_eq!(p.blk_size, 4096);
        assert_eq!(p.physical_block_exp, 3);
        assert_eq!(p.num_queues, 4);
        assert_eq!(p.max_discard_sectors, 65536);
        assert_eq!(p.write_zeroes_may_unmap, 1);
        assert_eq!(p.zone_sectors, 524288);
        assert_eq!(p.zoned_model, 1);
        assert!(p.is_zoned());
        assert_eq!(p.zone_bytes(), 256 << 20);
        // 2048 sectors in zones of 524288: one (short) zone.
        assert_eq!(p.nr_zones(), 1);
    }

    #[test]
    fn short_config_reads_as_zero_past_its_end() {
        let p = BlkConfig::parse(&[1, 0, 0, 0, 0, 0, 0, 0, 9]);
        assert_eq!(p.capacity, 1);
        assert_eq!(p.size_max, 9);
        assert_eq!(p.num_queues, 0);
        assert_eq!(p.raw.len(), 9);
    }
}
