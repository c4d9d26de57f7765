//! What the zone layer's two kinds share: zone conditions and types,
//! geometry and limits, errors, and the tickets of reserved writes.

use std::io;

use blkmesh_ipc::ring::zone_status;

use crate::errno::Errno;

/// Zone conditions, numbered as virtio-blk's `z_state` (and the kernel's
/// `BLK_ZONE_COND_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Cond {
    NotWritePointer = 0,
    Empty = 1,
    ImplicitOpen = 2,
    ExplicitOpen = 3,
    Closed = 4,
    ReadOnly = 13,
    Full = 14,
    Offline = 15,
}

impl Cond {
    pub fn from_u8(v: u8) -> Option<Cond> {
        Some(match v {
            0 => Cond::NotWritePointer,
            1 => Cond::Empty,
            2 => Cond::ImplicitOpen,
            3 => Cond::ExplicitOpen,
            4 => Cond::Closed,
            13 => Cond::ReadOnly,
            14 => Cond::Full,
            15 => Cond::Offline,
            _ => return None,
        })
    }

    pub(super) fn is_open(self) -> bool {
        matches!(self, Cond::ImplicitOpen | Cond::ExplicitOpen)
    }

    pub(super) fn is_active(self) -> bool {
        self.is_open() || self == Cond::Closed
    }
}

/// Zone types, numbered as virtio-blk's `z_type`.
pub const TYPE_CONVENTIONAL: u8 = 1;
pub const TYPE_SEQ_REQUIRED: u8 = 2;
pub const TYPE_SEQ_PREFERRED: u8 = 3;

/// One zone as reported, in bytes of the layer's coordinates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZoneView {
    pub start: u64,
    pub len: u64,
    pub capacity: u64,
    pub wp: u64,
    pub zone_type: u8,
    pub cond: Cond,
}

/// Why a zone operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ZoneError {
    #[error("the zone's condition forbids this operation")]
    InvalidCmd,
    #[error("write not at the zone's write pointer or not a multiple of the write granularity")]
    UnalignedWp,
    #[error("too many open zones")]
    OpenResource,
    #[error("too many active zones")]
    ActiveResource,
    #[error("offset is not the start of a zone of the device")]
    BadOffset,
    /// A write to the zone is in flight on a device that takes one at a
    /// time: try again shortly.
    #[error("zone busy")]
    Busy,
    #[error("I/O error ({0})")]
    Io(Errno),
}

impl ZoneError {
    /// The completion result on the ring (negative).
    pub fn ring_result(self) -> i32 {
        match self {
            ZoneError::InvalidCmd | ZoneError::BadOffset => zone_status::INVALID_CMD,
            ZoneError::UnalignedWp => zone_status::UNALIGNED_WP,
            ZoneError::OpenResource => zone_status::OPEN_RESOURCE,
            ZoneError::ActiveResource => zone_status::ACTIVE_RESOURCE,
            ZoneError::Busy => Errno::EBUSY.ring_result(),
            ZoneError::Io(e) => e.ring_result(),
        }
    }

    /// The errno of a control-channel failure: the zone statuses are
    /// negated errnos too (EBADRQC, EILSEQ, ETOOMANYREFS, EOVERFLOW).
    pub fn errno(self) -> Errno {
        match self {
            ZoneError::BadOffset => Errno::EINVAL,
            ZoneError::Busy => Errno::EBUSY,
            ZoneError::Io(e) => e,
            e => Errno::new(e.ring_result()).unwrap_or(Errno::EIO),
        }
    }

    pub(super) fn from_io(e: &io::Error) -> ZoneError {
        match e.raw_os_error() {
            Some(libc::ETOOMANYREFS) => ZoneError::OpenResource,
            Some(libc::EOVERFLOW) => ZoneError::ActiveResource,
            _ => ZoneError::Io(Errno::of_io(e)),
        }
    }
}

/// A zone management action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Open,
    Close,
    Finish,
    Reset,
}

/// What writes into a zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// A write (or write-zeroes) at a given offset: must be at the write pointer.
    Write,
    /// A zone append: lands at the write pointer of the zone starting at
    /// the given offset.
    Append,
}

/// Zone geometry (fixed for the life of the metadata).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per zone, a power of two.
    pub zone_size: u64,
    /// Writable bytes per zone.
    pub capacity: u64,
    pub nr_zones: u32,
}

impl Geometry {
    pub(super) fn zone_of(&self, offset: u64) -> Option<usize> {
        let z = offset / self.zone_size;
        (z < self.nr_zones as u64).then_some(z as usize)
    }

    pub(super) fn start(&self, z: usize) -> u64 {
        z as u64 * self.zone_size
    }

    /// The zone of `offset`, where it starts, and `offset` from there.
    pub(super) fn locate(&self, offset: u64) -> Result<(usize, u64, u64), ZoneError> {
        let z = self.zone_of(offset).ok_or(ZoneError::BadOffset)?;
        let start = self.start(z);
        Ok((z, start, offset - start))
    }
}

/// Limits that may change when the graph is reopened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZoneLimits {
    /// Writes to sequential zones are multiples of this (bytes).
    pub granularity: u32,
    /// Largest zone append (bytes).
    pub max_append: u64,
    /// 0 = no limit.
    pub max_open: u32,
    pub max_active: u32,
}

/// A reserved write: where its data goes, to hand back on completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub zone: u32,
    /// Byte offset (layer coordinates) where the data goes.
    pub offset: u64,
    pub len: u64,
    pub(super) gen: u32,
    /// Emulation: a replayed write that moves nothing. Device: no tracking
    /// (a conventional zone).
    pub(super) untracked: bool,
}
