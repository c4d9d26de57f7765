//! virtio-blk's request layouts and codes, as the guest writes them
//! (virtio 1.3, 5.2.6): the request header, the discard / write-zeroes
//! range, the request types and the status byte.
//!
//! The layouts are plain little-endian structs read from guest memory with
//! vm-memory's bounds-checked accessors; the only unsafe code is the
//! promise that they are plain data.

use blkmesh_ipc::ring::zone_status;
use vm_memory::{ByteValued, Le32, Le64};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_S_ZONE_ACTIVE_RESOURCE,
    VIRTIO_BLK_S_ZONE_INVALID_CMD, VIRTIO_BLK_S_ZONE_OPEN_RESOURCE, VIRTIO_BLK_S_ZONE_UNALIGNED_WP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_T_ZONE_APPEND, VIRTIO_BLK_T_ZONE_CLOSE,
    VIRTIO_BLK_T_ZONE_FINISH, VIRTIO_BLK_T_ZONE_OPEN, VIRTIO_BLK_T_ZONE_REPORT,
    VIRTIO_BLK_T_ZONE_RESET, VIRTIO_BLK_T_ZONE_RESET_ALL,
};

/// `struct virtio_blk_outhdr`: the first 16 readable bytes of a request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestHeader {
    /// `VIRTIO_BLK_T_*`.
    pub request_type: Le32,
    pub reserved: Le32,
    /// In 512-byte sectors, whatever the block size.
    pub sector: Le64,
}

/// Bytes of the request header.
pub const HEADER: u64 = std::mem::size_of::<RequestHeader>() as u64;

// SAFETY: `RequestHeader` is `repr(C)`, made of little-endian integers
// only, with no padding (4 + 4 + 8 bytes, 8-byte aligned at offset 8):
// every byte pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

/// `struct virtio_blk_discard_write_zeroes`: the one range of a discard
/// or write-zeroes request (we offer `max_*_seg` = 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiscardRange {
    pub sector: Le64,
    pub num_sectors: Le32,
    /// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP` or 0.
    pub flags: Le32,
}

// SAFETY: `DiscardRange` is `repr(C)`, made of little-endian integers
// only, with no padding (8 + 4 + 4 bytes): every byte pattern is valid.
unsafe impl ByteValued for DiscardRange {}

/// A fieldless enum of virtio codes, and the lookup from a code.
macro_rules! virtio_codes {
    ($(#[$meta:meta])* pub enum $name:ident: $repr:ident {
        $($(#[$vmeta:meta])* $variant:ident = $code:expr,)*
    }) => {
        $(#[$meta])*
        #[repr($repr)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $code as $repr,)*
        }

        impl $name {
            /// The value `code` names, if the device knows it.
            pub fn from_code(code: $repr) -> Option<Self> {
                $(if code == $code as $repr {
                    return Some(Self::$variant);
                })*
                None
            }
        }
    };
}

virtio_codes! {
    /// A virtio-blk request type this device knows.
    pub enum RequestType: u32 {
        In = VIRTIO_BLK_T_IN,
        Out = VIRTIO_BLK_T_OUT,
        Flush = VIRTIO_BLK_T_FLUSH,
        GetId = VIRTIO_BLK_T_GET_ID,
        Discard = VIRTIO_BLK_T_DISCARD,
        WriteZeroes = VIRTIO_BLK_T_WRITE_ZEROES,
        ZoneAppend = VIRTIO_BLK_T_ZONE_APPEND,
        ZoneReport = VIRTIO_BLK_T_ZONE_REPORT,
        ZoneOpen = VIRTIO_BLK_T_ZONE_OPEN,
        ZoneClose = VIRTIO_BLK_T_ZONE_CLOSE,
        ZoneFinish = VIRTIO_BLK_T_ZONE_FINISH,
        ZoneReset = VIRTIO_BLK_T_ZONE_RESET,
        ZoneResetAll = VIRTIO_BLK_T_ZONE_RESET_ALL,
    }
}

impl RequestType {
    /// Whether this is one of the zoned-device requests.
    pub fn is_zone_request(self) -> bool {
        use RequestType::*;
        matches!(
            self,
            ZoneAppend | ZoneReport | ZoneOpen | ZoneClose | ZoneFinish | ZoneReset | ZoneResetAll
        )
    }

    /// The statistics kind of the request (GET_ID has none).
    pub fn op_kind(self) -> Option<blkmesh_stats::OpKind> {
        use blkmesh_stats::OpKind;
        match self {
            RequestType::In => Some(OpKind::Read),
            RequestType::Out => Some(OpKind::Write),
            RequestType::Flush => Some(OpKind::Flush),
            RequestType::Discard => Some(OpKind::Discard),
            RequestType::WriteZeroes => Some(OpKind::WriteZeroes),
            // An append is a write; zone reports and zone management have
            // no kind of their own and are not counted.
            RequestType::ZoneAppend => Some(OpKind::Write),
            _ => None,
        }
    }
}

impl RequestHeader {
    /// The request's type, if the device knows it.
    pub fn request_type(&self) -> Option<RequestType> {
        RequestType::from_code(self.request_type.to_native())
    }

    pub fn sector(&self) -> u64 {
        self.sector.to_native()
    }
}

virtio_codes! {
    /// The status byte a request completes with.
    pub enum Status: u8 {
        Ok = VIRTIO_BLK_S_OK,
        IoErr = VIRTIO_BLK_S_IOERR,
        Unsupp = VIRTIO_BLK_S_UNSUPP,
        ZoneInvalidCmd = VIRTIO_BLK_S_ZONE_INVALID_CMD,
        ZoneUnalignedWp = VIRTIO_BLK_S_ZONE_UNALIGNED_WP,
        ZoneOpenResource = VIRTIO_BLK_S_ZONE_OPEN_RESOURCE,
        ZoneActiveResource = VIRTIO_BLK_S_ZONE_ACTIVE_RESOURCE,
    }
}

impl Status {
    /// The byte written into the guest's status field.
    pub fn byte(self) -> u8 {
        self as u8
    }
}

/// The virtio status for a worker's result (0 or -errno), on a connection
/// without VIRTIO_BLK_F_ZONED: zone errors are plain I/O errors there.
pub fn status_of(result: i32) -> Status {
    // The worker is not trusted: any value, i32::MIN included, maps.
    match result {
        0 => Status::Ok,
        r if r == -libc::EOPNOTSUPP => Status::Unsupp,
        _ => Status::IoErr,
    }
}

/// The virtio status for a worker's result on a connection that
/// negotiated VIRTIO_BLK_F_ZONED: the ring's zone results
/// ([`zone_status`]) become the zone statuses, for
/// every request type (writes to a zone fail with them too).
pub fn zoned_status_of(result: i32) -> Status {
    match result {
        zone_status::INVALID_CMD => Status::ZoneInvalidCmd,
        zone_status::UNALIGNED_WP => Status::ZoneUnalignedWp,
        zone_status::OPEN_RESOURCE => Status::ZoneOpenResource,
        zone_status::ACTIVE_RESOURCE => Status::ZoneActiveResource,
        r => status_of(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_virtio() {
        assert_eq!(std::mem::size_of::<RequestHeader>(), 16);
        assert_eq!(std::mem::size_of::<DiscardRange>(), 16);
        let mut h = RequestHeader::default();
        h.as_mut_slice()[0..4].copy_from_slice(&VIRTIO_BLK_T_ZONE_APPEND.to_le_bytes());
        h.as_mut_slice()[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(h.request_type(), Some(RequestType::ZoneAppend));
        assert_eq!(h.sector(), 0x1122_3344_5566_7788);
    }

    #[test]
    fn codes_round_trip() {
        for code in 0..64 {
            if let Some(t) = RequestType::from_code(code) {
                assert_eq!(t as u32, code);
            }
        }
        assert_eq!(RequestType::from_code(u32::MAX), None);
        for byte in 0..=u8::MAX {
            if let Some(s) = Status::from_code(byte) {
                assert_eq!(s.byte(), byte);
            }
        }
        assert_eq!(Status::from_code(7), None);
    }
}
