//! Zoned block devices (virtio 1.2+, 5.2.6 "Zoned Block Devices"): request
//! types, statuses, and the zone report format.
//!
//! Zone requests are only valid once `VIRTIO_BLK_F_ZONED` ([`F_ZONED`]) was
//! negotiated (it is in [`crate::DEFAULT_FEATURES`]); a device refuses them
//! with [`crate::S_UNSUPP`] otherwise. See the `zone_*` methods of
//! [`crate::VhostUserBlk`] for the convenience calls and
//! [`crate::RequestSpec::zone_report`] and friends to build the requests by
//! hand. Sectors are 512 bytes throughout, whatever the block size.

use crate::error::Error;

/// `VIRTIO_BLK_F_ZONED`: the device is zoned (feature bit 17).
pub const F_ZONED: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_F_ZONED;

/// `VIRTIO_BLK_T_ZONE_APPEND`: write at the zone's write pointer; the
/// device returns where the data landed.
pub const T_ZONE_APPEND: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_ZONE_APPEND;
/// `VIRTIO_BLK_T_ZONE_REPORT`.
pub const T_ZONE_REPORT: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_ZONE_REPORT;
/// `VIRTIO_BLK_T_ZONE_OPEN` (explicit open).
pub const T_ZONE_OPEN: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_ZONE_OPEN;
/// `VIRTIO_BLK_T_ZONE_CLOSE`.
pub const T_ZONE_CLOSE: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_ZONE_CLOSE;
/// `VIRTIO_BLK_T_ZONE_FINISH`.
pub const T_ZONE_FINISH: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_ZONE_FINISH;
/// `VIRTIO_BLK_T_ZONE_RESET`.
pub const T_ZONE_RESET: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_ZONE_RESET;
/// `VIRTIO_BLK_T_ZONE_RESET_ALL`.
pub const T_ZONE_RESET_ALL: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_ZONE_RESET_ALL;

pub use crate::status::{
    status_name, S_ZONE_ACTIVE_RESOURCE, S_ZONE_INVALID_CMD, S_ZONE_OPEN_RESOURCE,
    S_ZONE_UNALIGNED_WP,
};

/// Zoned model `VIRTIO_BLK_Z_NONE` in the config space.
pub const Z_NONE: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_Z_NONE as u8;
/// Zoned model `VIRTIO_BLK_Z_HM`: host-managed.
pub const Z_HM: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_Z_HM as u8;
/// Zoned model `VIRTIO_BLK_Z_HA`: host-aware.
pub const Z_HA: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_Z_HA as u8;

/// Bytes of the report header (`nr_zones` and 56 reserved bytes).
pub const REPORT_HEADER_SIZE: usize = 64;
/// Bytes of one zone descriptor in a report.
pub const ZONE_DESCRIPTOR_SIZE: usize = 64;
/// Bytes of the `append_sector` field a zone append returns before the
/// status byte.
pub const APPEND_SECTOR_SIZE: u32 = 8;

/// A zone's type (`z_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ZoneType {
    /// `VIRTIO_BLK_ZT_CONV`: written anywhere, like a regular device.
    Conventional,
    /// `VIRTIO_BLK_ZT_SWR`: sequential write required.
    SequentialWriteRequired,
    /// `VIRTIO_BLK_ZT_SWP`: sequential write preferred.
    SequentialWritePreferred,
    /// A value the spec does not define.
    Other(u8),
}

impl ZoneType {
    /// From the descriptor byte.
    pub fn from_u8(v: u8) -> ZoneType {
        match v {
            1 => ZoneType::Conventional,
            2 => ZoneType::SequentialWriteRequired,
            3 => ZoneType::SequentialWritePreferred,
            v => ZoneType::Other(v),
        }
    }

    /// The descriptor byte.
    pub fn as_u8(self) -> u8 {
        match self {
            ZoneType::Conventional => 1,
            ZoneType::SequentialWriteRequired => 2,
            ZoneType::SequentialWritePreferred => 3,
            ZoneType::Other(v) => v,
        }
    }
}

/// A zone's condition (`z_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ZoneState {
    /// `VIRTIO_BLK_ZS_NOT_WP`: conventional zones.
    NotWritePointer,
    /// `VIRTIO_BLK_ZS_EMPTY`.
    Empty,
    /// `VIRTIO_BLK_ZS_IOPEN`: opened by a write.
    ImplicitOpen,
    /// `VIRTIO_BLK_ZS_EOPEN`: opened by ZONE_OPEN.
    ExplicitOpen,
    /// `VIRTIO_BLK_ZS_CLOSED`.
    Closed,
    /// `VIRTIO_BLK_ZS_RDONLY`.
    ReadOnly,
    /// `VIRTIO_BLK_ZS_FULL`.
    Full,
    /// `VIRTIO_BLK_ZS_OFFLINE`.
    Offline,
    /// A value the spec does not define.
    Other(u8),
}

impl ZoneState {
    /// From the descriptor byte.
    pub fn from_u8(v: u8) -> ZoneState {
        match v {
            0 => ZoneState::NotWritePointer,
            1 => ZoneState::Empty,
            2 => ZoneState::ImplicitOpen,
            3 => ZoneState::ExplicitOpen,
            4 => ZoneState::Closed,
            13 => ZoneState::ReadOnly,
            14 => ZoneState::Full,
            15 => ZoneState::Offline,
            v => ZoneState::Other(v),
        }
    }

    /// The descriptor byte.
    pub fn as_u8(self) -> u8 {
        match self {
            ZoneState::NotWritePointer => 0,
            ZoneState::Empty => 1,
            ZoneState::ImplicitOpen => 2,
            ZoneState::ExplicitOpen => 3,
            ZoneState::Closed => 4,
            ZoneState::ReadOnly => 13,
            ZoneState::Full => 14,
            ZoneState::Offline => 15,
            ZoneState::Other(v) => v,
        }
    }

    /// Whether the zone counts against `max_open_zones`.
    pub fn is_open(self) -> bool {
        matches!(self, ZoneState::ImplicitOpen | ZoneState::ExplicitOpen)
    }

    /// Whether the zone counts against `max_active_zones`.
    pub fn is_active(self) -> bool {
        self.is_open() || self == ZoneState::Closed
    }
}

/// One zone of a report (`struct virtio_blk_zone_descriptor`). Addresses
/// and sizes are in 512-byte sectors, as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ZoneDescriptor {
    /// First sector of the zone (`z_start`).
    pub start: u64,
    /// Writable sectors from `start` (`z_cap`).
    pub capacity: u64,
    /// Where the next write must go (`z_wp`); meaningless for conventional,
    /// read-only, full and offline zones.
    pub write_pointer: u64,
    /// `z_type`.
    pub zone_type: ZoneType,
    /// `z_state`.
    pub state: ZoneState,
}

impl ZoneDescriptor {
    /// Parses one 64-byte descriptor.
    pub fn parse(b: &[u8; ZONE_DESCRIPTOR_SIZE]) -> ZoneDescriptor {
        let u64_at = |at: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(v)
        };
        ZoneDescriptor {
            capacity: u64_at(0),
            start: u64_at(8),
            write_pointer: u64_at(16),
            zone_type: ZoneType::from_u8(b[24]),
            state: ZoneState::from_u8(b[25]),
        }
    }

    /// The 64 bytes of this descriptor (reserved bytes zero).
    pub fn to_bytes(&self) -> [u8; ZONE_DESCRIPTOR_SIZE] {
        let mut b = [0u8; ZONE_DESCRIPTOR_SIZE];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        b[8..16].copy_from_slice(&self.start.to_le_bytes());
        b[16..24].copy_from_slice(&self.write_pointer.to_le_bytes());
        b[24] = self.zone_type.as_u8();
        b[25] = self.state.as_u8();
        b
    }
}

/// Bytes of a report buffer with room for `zones` descriptors.
pub fn report_len(zones: u32) -> u64 {
    REPORT_HEADER_SIZE as u64 + zones as u64 * ZONE_DESCRIPTOR_SIZE as u64
}

/// Parses a zone report (`struct virtio_blk_zone_report`) from the bytes
/// the device wrote. `nr_zones` must not claim more descriptors than
/// `bytes` holds.
pub fn parse_report(bytes: &[u8]) -> Result<Vec<ZoneDescriptor>, Error> {
    if bytes.len() < REPORT_HEADER_SIZE {
        return Err(Error::Invalid(format!(
            "zone report of {} bytes has no room for its {REPORT_HEADER_SIZE}-byte header",
            bytes.len()
        )));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[0..8]);
    let nr_zones = u64::from_le_bytes(n);
    let room = ((bytes.len() - REPORT_HEADER_SIZE) / ZONE_DESCRIPTOR_SIZE) as u64;
    if nr_zones > room {
        return Err(Error::Invalid(format!(
            "zone report claims {nr_zones} zones, its {} bytes hold {room}",
            bytes.len()
        )));
    }
    Ok(bytes[REPORT_HEADER_SIZE..]
        .chunks_exact(ZONE_DESCRIPTOR_SIZE)
        .take(nr_zones as usize)
        .map(|c| {
            let mut d = [0u8; ZONE_DESCRIPTOR_SIZE];
            d.copy_from_slice(c);
            ZoneDescriptor::parse(&d)
        })
        .collect())
}

/// Parses the `append_sector` a zone append returned.
pub fn parse_append_sector(bytes: &[u8]) -> Result<u64, Error> {
    let b: [u8; 8] = bytes
        .get(..APPEND_SECTOR_SIZE as usize)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::Invalid("zone append returned no append_sector".into()))?;
    Ok(u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(start: u64, wp: u64, state: ZoneState) -> ZoneDescriptor {
        ZoneDescriptor {
            start,
            capacity: 1024,
            write_pointer: wp,
            zone_type: ZoneType::SequentialWriteRequired,
            state,
        }
    }

    #[test]
    fn report_round_trips_through_the_wire_format() {
        let zones = [
            zone(0, 8, ZoneState::ImplicitOpen),
            zone(2048, 2048, ZoneState::Empty),
            zone(4096, 0, ZoneState::Full),
        ];
        let mut b = vec![0u8; report_len(4) as usize];
        b[0..8].copy_from_slice(&3u64.to_le_bytes());
        for (i, z) in zones.iter().enumerate() {
            let at = REPORT_HEADER_SIZE + i * ZONE_DESCRIPTOR_SIZE;
            b[at..at + ZONE_DESCRIPTOR_SIZE].copy_from_slice(&z.to_bytes());
        }
        assert_eq!(parse_report(&b).unwrap(), zones.to_vec());
        // Offsets as in the spec: z_cap 0, z_start 8, z_wp 16, type 24, state 25.
        let d = zones[0].to_bytes();
        assert_eq!(d[8..16], 0u64.to_le_bytes());
        assert_eq!(d[16..24], 8u64.to_le_bytes());
        assert_eq!((d[24], d[25]), (2, 2));
        // Only the descriptors nr_zones counts.
        b[0..8].copy_from_slice(&1u64.to_le_bytes());
        assert_eq!(parse_report(&b).unwrap(), zones[..1].to_vec());
    }

    #[test]
    fn report_claiming_more_than_its_buffer_is_refused() {
        let mut b = vec![0u8; report_len(1) as usize];
        b[0..8].copy_from_slice(&2u64.to_le_bytes());
        assert!(parse_report(&b).is_err());
        assert!(parse_report(&[0u8; 63]).is_err());
        assert_eq!(parse_report(&[0u8; 64]).unwrap(), vec![]);
    }

    #[test]
    fn states_types_and_statuses_have_names() {
        for v in 0..=255u8 {
            assert_eq!(ZoneState::from_u8(v).as_u8(), v);
            assert_eq!(ZoneType::from_u8(v).as_u8(), v);
        }
        assert!(ZoneState::Closed.is_active() && !ZoneState::Closed.is_open());
        assert!(ZoneState::ExplicitOpen.is_open());
        assert!(!ZoneState::Full.is_active());
        assert_eq!(status_name(3), "ZONE_INVALID_CMD");
        assert_eq!(status_name(4), "ZONE_UNALIGNED_WP");
        assert_eq!(status_name(5), "ZONE_OPEN_RESOURCE");
        assert_eq!(status_name(6), "ZONE_ACTIVE_RESOURCE");
        assert_eq!(status_name(2), "UNSUPP");
        assert_eq!(status_name(77), "unknown");
        assert_eq!(parse_append_sector(&16u64.to_le_bytes()).unwrap(), 16);
        assert!(parse_append_sector(&[1, 2]).is_err());
    }
}
