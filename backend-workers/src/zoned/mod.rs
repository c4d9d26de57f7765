//! Zoned block devices: the zone layer of a graph.
//!
//! A graph has at most one zone layer, a [`ZoneLayer`] in a
//! [`Stage::Zoned`](crate::stages::Stage::Zoned):
//!
//! - [`ZonedState`]: a `zoned` format node that emulates a host-managed
//!   zoned device over a regular child, with zone conditions and write
//!   pointers kept in a metadata file;
//! - [`ZonedDevice`]: an `io_uring` leaf on a Linux zoned block device,
//!   whose zones are the device's own (reports and zone management through
//!   the block layer's ioctls, zone append emulated by writes at the write
//!   pointer).
//!
//! Raw windows and filters above the layer pass zone operations through;
//! windows must be zone-aligned (checked at open, see `graph.rs`).
//!
//! # The emulation's state machine
//!
//! ZBC/ZNS rules, as null_blk implements them: a write must start at the
//! zone's write pointer (`UNALIGNED_WP`), be a multiple of the write
//! granularity (`UNALIGNED_WP`) and not cross the zone capacity
//! (`INVALID_CMD`); writing a full, read-only or offline zone is
//! `INVALID_CMD`. Writes and appends implicitly open an empty or closed zone;
//! when `max_open_zones` are open the least recently written implicitly open
//! zone is closed to make room, and only explicitly open zones left is
//! `OPEN_RESOURCE`; an empty zone needs an active slot (`ACTIVE_RESOURCE`).
//! Open (explicit) takes empty, implicitly open and closed zones; close
//! takes open zones (to CLOSED, or EMPTY when nothing was written), a closed
//! zone is left as it is, an empty or full one is `INVALID_CMD`; finish
//! makes any writable zone FULL with the write pointer at the zone end;
//! reset makes it EMPTY (the data is left in place). Reads go anywhere.
//!
//! # Concurrency
//!
//! One [`ZonedState`] per node per worker process (see [`open_emulated`]),
//! shared by every queue thread of every export that uses the node. All zone
//! state sits behind one mutex, held for a few hundred nanoseconds per
//! request (reserve at submission, record at completion), never across I/O.
//! A write or append reserves its range at submission: the in-memory write
//! pointer moves at once, so appends from several queues get distinct,
//! adjacent ranges, and a write is accepted while earlier ones are in
//! flight only when it starts exactly at the reserved end. Each zone keeps
//! the ranges in flight in submission order; the write pointer that is
//! persisted is the end of the prefix of them that has completed.
//!
//! A failed write that is still the zone's last reservation gives its range
//! back (the write pointer returns to its start). A failed write with later
//! writes already reserved behind it cannot be undone without invalidating
//! those: its range counts as written with undefined content.
//!
//! # Persistence and crash consistency
//!
//! The metadata file (`ZonedOptions.metadata_path`) is a 4096-byte header
//! (magic `BLKMZONE`, version, record size, zone size, zone capacity,
//! number of zones; a file of another geometry is refused unless empty)
//! followed by one 32-byte record per zone: condition (the virtio `z_state`
//! number; 0 reads as EMPTY), the persisted write pointer (bytes from the
//! zone start), and the last completed write ending there (start, length).
//!
//! A record is rewritten with `pwrite` (under the state's mutex, so records
//! reach the page cache in the order the state changed) whenever what it
//! would say changes: after a write's data completed, never before, and
//! with a write pointer that never passes a range still in flight (while
//! writes are in flight the record holds the completed prefix, and a zone
//! those writes made FULL is recorded as still open). The page cache
//! survives a `kill -9` of the worker, so a restarted worker never finds a
//! write pointer past data that was not written. Once the leaf completed a
//! flush from the guest, or a FUA write, the metadata file is `fdatasync`ed
//! (when a record changed since the last sync), so the zone state is on
//! stable storage after the data it describes. Against power loss that is
//! the guarantee: state up to the last completed flush; records written
//! since may have been written back by the kernel ahead of their data (the
//! page cache writes the two files back independently). Records are 32-byte
//! aligned within a sector, which the storage writes whole.
//!
//! On open the state is loaded as it was: open zones stay open (explicitly
//! or implicitly) and keep their write pointer, so a worker that restarts
//! under a running guest changes nothing the guest can see. That is the
//! failover case: the frontend resubmits the requests that were in flight
//! when the worker died. A write whose data and record reached the file
//! but whose completion did not reach the frontend comes back as a write
//! below the write pointer; the first write to a zone after a load that
//! matches the zone's recorded last write exactly is therefore accepted
//! again (rewritten in place, write pointer unchanged). Resubmitted appends
//! append again (the first copy stays in the zone as unreferenced data).
//!
//! Reset and finish abandon the ranges still in flight in the zone: their
//! completions no longer move anything.

mod device;
mod emulated;
mod metadata;

use std::io;
use std::ops::Range;

use blkmesh_ipc::ring::zone_status;
use blkmesh_proto::v1::ZoneModel;

use crate::errno::Errno;

pub use device::{nvme_generic_is_zoned, probe_block_device, probe_queue, SysZoned, ZonedDevice};
pub use emulated::{open_emulated, ZonedState, MAX_ZONES};
pub use metadata::{HEADER_SIZE, RECORD_SIZE};

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

    fn is_open(self) -> bool {
        matches!(self, Cond::ImplicitOpen | Cond::ExplicitOpen)
    }

    fn is_active(self) -> bool {
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
            ZoneError::Busy => -libc::EBUSY,
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

    fn from_io(e: &io::Error) -> ZoneError {
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
    fn zone_of(&self, offset: u64) -> Option<usize> {
        let z = offset / self.zone_size;
        (z < self.nr_zones as u64).then_some(z as usize)
    }

    fn start(&self, z: usize) -> u64 {
        z as u64 * self.zone_size
    }

    /// The zone of `offset`, where it starts, and `offset` from there.
    fn locate(&self, offset: u64) -> Result<(usize, u64, u64), ZoneError> {
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
    gen: u32,
    /// Emulation: a replayed write that moves nothing. Device: no tracking
    /// (a conventional zone).
    untracked: bool,
}

/// The zone layer of a graph.
#[derive(Debug)]
pub enum ZoneLayer {
    Emulated(ZonedState),
    Device(ZonedDevice),
}

impl ZoneLayer {
    pub fn geometry(&self) -> Geometry {
        match self {
            ZoneLayer::Emulated(s) => s.geometry(),
            ZoneLayer::Device(d) => d.geo,
        }
    }

    pub fn limits(&self) -> ZoneLimits {
        match self {
            ZoneLayer::Emulated(s) => s.limits(),
            ZoneLayer::Device(d) => d.limits,
        }
    }

    pub fn model(&self) -> ZoneModel {
        match self {
            ZoneLayer::Emulated(_) => ZoneModel::HostManaged,
            ZoneLayer::Device(d) => d.model,
        }
    }

    /// Up to `max` zones from zone `first`, stopping before zone `end`.
    pub fn report(
        &self,
        first: u32,
        end: u32,
        max: usize,
        out: &mut Vec<ZoneView>,
    ) -> Result<(), ZoneError> {
        match self {
            ZoneLayer::Emulated(s) => {
                s.report(first, end, max, out);
                Ok(())
            }
            ZoneLayer::Device(d) => d.report(first, end, max, out),
        }
    }

    /// Applies `action` to the zone starting at `offset`; the zone after it.
    pub fn manage(&self, action: Action, offset: u64) -> Result<ZoneView, ZoneError> {
        let geo = self.geometry();
        let z = geo.zone_of(offset).ok_or(ZoneError::BadOffset)?;
        if offset != geo.start(z) {
            return Err(ZoneError::BadOffset);
        }
        match self {
            ZoneLayer::Emulated(s) => s.manage(action, z),
            ZoneLayer::Device(d) => d.manage(action, z),
        }
    }

    /// Resets every zone of `zones` that can be.
    pub fn reset_all(&self, zones: Range<u32>) -> Result<(), ZoneError> {
        match self {
            ZoneLayer::Emulated(s) => s.reset_all(zones),
            ZoneLayer::Device(d) => d.reset_all(zones),
        }
    }

    /// Checks and reserves a write of `len` bytes at `offset` (layer
    /// coordinates; for an append, the zone start).
    pub fn begin_write(&self, kind: WriteKind, offset: u64, len: u64) -> Result<Ticket, ZoneError> {
        match self {
            ZoneLayer::Emulated(s) => s.begin_write(kind, offset, len),
            ZoneLayer::Device(d) => d.begin_write(kind, offset, len),
        }
    }

    /// A reserved write completed (`ok`) or failed. An error means the
    /// zone state could not be recorded (the write should fail).
    pub fn end_write(&self, t: &Ticket, ok: bool) -> Result<(), ZoneError> {
        match self {
            ZoneLayer::Emulated(s) => s.end_write(t, ok),
            ZoneLayer::Device(d) => {
                d.end_write(t, ok);
                Ok(())
            }
        }
    }

    /// Makes recorded zone state durable (flush, FUA).
    pub fn sync(&self) -> Result<(), ZoneError> {
        match self {
            ZoneLayer::Emulated(s) => s.sync(),
            ZoneLayer::Device(_) => Ok(()),
        }
    }
}

/// Writes `views` (zones `start` shifted down by `shift`) as virtio-blk's
/// `struct virtio_blk_zone_report` into `out`, as many as fit in `room`
/// bytes; returns the bytes written. `room` must hold the 64-byte header.
pub fn encode_report(views: &[ZoneView], shift: u64, room: usize, out: &mut Vec<u8>) -> usize {
    let n = views.len().min(room.saturating_sub(64) / 64);
    out.clear();
    out.resize(64 + 64 * n, 0);
    out[..8].copy_from_slice(&(n as u64).to_le_bytes());
    for (i, v) in views[..n].iter().enumerate() {
        let d = &mut out[64 + 64 * i..128 + 64 * i];
        d[0..8].copy_from_slice(&(v.capacity / 512).to_le_bytes());
        d[8..16].copy_from_slice(&((v.start - shift) / 512).to_le_bytes());
        d[16..24].copy_from_slice(&(v.wp.saturating_sub(shift) / 512).to_le_bytes());
        d[24] = v.zone_type;
        d[25] = v.cond as u8;
    }
    out.len()
}

#[cfg(test)]
mod tests;
