//! Split-virtqueue layout arithmetic (virtio 1.x, section 2.7) and the
//! descriptor format.
//!
//! ```text
//! descriptor table  16 B × size, 16-byte aligned
//!                   { addr u64, len u32, flags u16, next u16 }
//! avail ring        flags u16, idx u16, ring[size] u16, used_event u16; 2-byte aligned
//! used ring         flags u16, idx u16, ring[size] { id u32, len u32 }, avail_event u16;
//!                   4-byte aligned
//! ```
//!
//! Everything in the rings is little-endian.

/// The descriptor continues via its `next` field.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// The buffer is device-writable (otherwise device-readable).
pub const VRING_DESC_F_WRITE: u16 = 2;
/// The buffer holds an indirect descriptor table.
pub const VRING_DESC_F_INDIRECT: u16 = 4;

/// Bytes of one descriptor.
pub const DESC_SIZE: u64 = 16;
/// Bytes of one used-ring element (`id u32, len u32`).
pub const USED_ELEM_SIZE: u64 = 8;
/// Largest split-queue size (virtio 1.x).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// One split-queue descriptor, as it lies in a descriptor table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest physical address of the buffer.
    pub addr: u64,
    /// Length of the buffer in bytes.
    pub len: u32,
    /// `VRING_DESC_F_*` bits.
    pub flags: u16,
    /// Index of the next descriptor when `flags` has [`VRING_DESC_F_NEXT`].
    pub next: u16,
}

impl Descriptor {
    /// A descriptor with these fields.
    pub fn new(addr: u64, len: u32, flags: u16, next: u16) -> Self {
        Descriptor {
            addr,
            len,
            flags,
            next,
        }
    }

    /// The 16 bytes of the descriptor as it lies in guest memory.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    /// Parses the 16 bytes of a descriptor.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        Descriptor {
            addr: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        }
    }

    /// The bytes of a table of descriptors (for an indirect table).
    pub fn table_bytes(descs: &[Descriptor]) -> Vec<u8> {
        descs.iter().flat_map(|d| d.to_bytes()).collect()
    }
}

/// Rounds `v` up to a multiple of `align` (a power of two).
pub fn align_up(v: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    (v + align - 1) & !(align - 1)
}

/// Where the three parts of one split virtqueue lie in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    /// Number of descriptors (a power of two).
    pub size: u16,
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the avail ring.
    pub avail: u64,
    /// Guest address of the used ring.
    pub used: u64,
}

impl RingLayout {
    /// Bytes of a descriptor table for `size` entries.
    pub fn desc_table_bytes(size: u16) -> u64 {
        DESC_SIZE * size as u64
    }

    /// Bytes of an avail ring for `size` entries, `used_event` included.
    pub fn avail_ring_bytes(size: u16) -> u64 {
        2 + 2 + 2 * size as u64 + 2
    }

    /// Bytes of a used ring for `size` entries, `avail_event` included.
    pub fn used_ring_bytes(size: u16) -> u64 {
        2 + 2 + USED_ELEM_SIZE * size as u64 + 2
    }

    /// Packs a queue of `size` entries from `base` on, each part at its
    /// required alignment (descriptor table 16, avail ring 2, used ring 4).
    /// `None` if `size` is not a power of two in `1..=32768`.
    pub fn at(base: u64, size: u16) -> Option<RingLayout> {
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return None;
        }
        let desc = align_up(base, 16);
        let avail = align_up(desc + Self::desc_table_bytes(size), 2);
        let used = align_up(avail + Self::avail_ring_bytes(size), 4);
        Some(RingLayout {
            size,
            desc,
            avail,
            used,
        })
    }

    /// First byte after the used ring.
    pub fn end(&self) -> u64 {
        self.used + Self::used_ring_bytes(self.size)
    }

    /// Address of descriptor `index` (any index; the table has `size`).
    pub fn desc_addr(&self, index: u16) -> u64 {
        self.desc + DESC_SIZE * index as u64
    }

    /// Address of the avail ring's `flags`.
    pub fn avail_flags_addr(&self) -> u64 {
        self.avail
    }

    /// Address of the avail ring's `idx`.
    pub fn avail_idx_addr(&self) -> u64 {
        self.avail + 2
    }

    /// Address of the avail ring slot that free-running index `idx` uses.
    pub fn avail_slot_addr(&self, idx: u16) -> u64 {
        self.avail + 4 + 2 * (idx % self.size) as u64
    }

    /// Address of `used_event` (after the avail ring's slots).
    pub fn used_event_addr(&self) -> u64 {
        self.avail + 4 + 2 * self.size as u64
    }

    /// Address of the used ring's `idx`.
    pub fn used_idx_addr(&self) -> u64 {
        self.used + 2
    }

    /// Address of the used ring element that free-running index `idx` uses.
    pub fn used_elem_addr(&self, idx: u16) -> u64 {
        self.used + 4 + USED_ELEM_SIZE * (idx % self.size) as u64
    }

    /// Address of `avail_event` (after the used ring's elements).
    pub fn avail_event_addr(&self) -> u64 {
        self.used + 4 + USED_ELEM_SIZE * self.size as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_parts_follow_each_other_at_spec_alignments() {
        let l = RingLayout::at(0x1000, 128).unwrap();
        assert_eq!(l.desc, 0x1000);
        assert_eq!(l.avail, 0x1000 + 16 * 128);
        // avail: 4 + 2*128 + 2 = 262 bytes → 0x1800 + 262 = 0x1906, aligned to 4 → 0x1908.
        assert_eq!(l.used, 0x1908);
        assert_eq!(l.end(), 0x1908 + 4 + 8 * 128 + 2);
    }

    #[test]
    fn unaligned_base_is_rounded_to_descriptor_alignment() {
        let l = RingLayout::at(0x1001, 1).unwrap();
        assert_eq!(l.desc, 0x1010);
        assert_eq!(l.avail, 0x1020);
        // 4 + 2 + 2 = 8 bytes of avail ring.
        assert_eq!(l.used, 0x1028);
        assert_eq!(l.used % 4, 0);
    }

    #[test]
    fn rejects_sizes_that_are_not_powers_of_two() {
        assert!(RingLayout::at(0, 0).is_none());
        assert!(RingLayout::at(0, 3).is_none());
        assert!(RingLayout::at(0, 32768).is_some());
    }

    #[test]
    fn slots_wrap_at_the_queue_size() {
        let l = RingLayout::at(0, 8).unwrap();
        assert_eq!(l.avail_slot_addr(0), l.avail + 4);
        assert_eq!(l.avail_slot_addr(9), l.avail + 4 + 2);
        assert_eq!(l.avail_slot_addr(u16::MAX), l.avail + 4 + 2 * 7);
        assert_eq!(l.used_elem_addr(8), l.used + 4);
        assert_eq!(l.used_event_addr(), l.avail + 4 + 16);
        assert_eq!(l.avail_event_addr(), l.used + 4 + 64);
        assert_eq!(l.desc_addr(3), l.desc + 48);
    }

    #[test]
    fn descriptor_round_trips_little_endian() {
        let d = Descriptor::new(0x1122_3344_5566_7788, 0x99aa_bbcc, 0x0003, 0x0102);
        let b = d.to_bytes();
        assert_eq!(b[0], 0x88);
        assert_eq!(b[8], 0xcc);
        assert_eq!(b[12], 0x03);
        assert_eq!(b[14], 0x02);
        assert_eq!(Descriptor::from_bytes(&b), d);
        assert_eq!(Descriptor::table_bytes(&[d, d]).len(), 32);
    }

    #[test]
    fn align_up_rounds_to_power_of_two() {
        assert_eq!(align_up(0, 4096), 0);
        assert_eq!(align_up(1, 4096), 4096);
        assert_eq!(align_up(4096, 4096), 4096);
        assert_eq!(align_up(17, 16), 32);
    }
}
