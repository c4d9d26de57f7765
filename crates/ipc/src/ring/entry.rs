//! The entries as they lie in shared memory (requests, segments,
//! completions), and the validated request the worker acts on.

use thiserror::Error;

/// Largest ring (and so largest virtqueue) supported.
pub const MAX_ENTRIES: u32 = 4096;
/// Largest scatter-gather list of one request.
pub const MAX_SEGMENTS: u32 = 1024;

/// Segments carried inside the request entry itself.
pub const INLINE_SEGMENTS: usize = 2;

/// Operations carried by the request ring: the whole virtio-blk op set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    Read = 1,
    Write = 2,
    Flush = 3,
    Discard = 4,
    WriteZeroes = 5,
    /// Device id string into the data segments.
    GetId = 6,
    /// Report zones from the one containing `offset` into the data
    /// segments, in virtio-blk's format (struct virtio_blk_zone_report:
    /// nr_zones and 56 reserved bytes, then 64-byte descriptors, all in
    /// 512-byte sectors); the completion's `extra` is the bytes written.
    ZoneReport = 10,
    ZoneOpen = 11,
    ZoneClose = 12,
    ZoneFinish = 13,
    ZoneReset = 14,
    ZoneResetAll = 15,
    /// Append to the zone at `offset`; the completion's `extra` is the byte
    /// offset where the data landed.
    ZoneAppend = 16,
}

impl Op {
    /// Decodes an op byte from the ring.
    pub fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Read,
            2 => Op::Write,
            3 => Op::Flush,
            4 => Op::Discard,
            5 => Op::WriteZeroes,
            6 => Op::GetId,
            10 => Op::ZoneReport,
            11 => Op::ZoneOpen,
            12 => Op::ZoneClose,
            13 => Op::ZoneFinish,
            14 => Op::ZoneReset,
            15 => Op::ZoneResetAll,
            16 => Op::ZoneAppend,
            _ => return None,
        })
    }

    /// Whether the op moves data through segments (and so needs at least one).
    pub fn has_data(self) -> bool {
        matches!(
            self,
            Op::Read | Op::Write | Op::GetId | Op::ZoneReport | Op::ZoneAppend
        )
    }

    /// Flags this op may carry.
    pub fn allowed_flags(self) -> u8 {
        match self {
            Op::Write | Op::ZoneAppend => FLAG_FUA,
            Op::WriteZeroes => FLAG_FUA | FLAG_NO_UNMAP,
            Op::Read
            | Op::Flush
            | Op::Discard
            | Op::GetId
            | Op::ZoneReport
            | Op::ZoneOpen
            | Op::ZoneClose
            | Op::ZoneFinish
            | Op::ZoneReset
            | Op::ZoneResetAll => 0,
        }
    }
}

/// Completion results for zone errors: negated errnos chosen for the ring
/// protocol, which the frontend turns into virtio-blk's zone statuses.
/// Any other negative result is a plain I/O error.
pub mod zone_status {
    /// VIRTIO_BLK_S_ZONE_INVALID_CMD: the zone's condition or type forbids
    /// the operation (writing a full zone, opening an offline one...).
    pub const INVALID_CMD: i32 = -libc::EBADRQC;
    /// VIRTIO_BLK_S_ZONE_UNALIGNED_WP: a write not at the write pointer.
    pub const UNALIGNED_WP: i32 = -libc::EILSEQ;
    /// VIRTIO_BLK_S_ZONE_OPEN_RESOURCE: too many open zones.
    pub const OPEN_RESOURCE: i32 = -libc::ETOOMANYREFS;
    /// VIRTIO_BLK_S_ZONE_ACTIVE_RESOURCE: too many active zones.
    pub const ACTIVE_RESOURCE: i32 = -libc::EOVERFLOW;
}

/// Force unit access: complete only once the data is on stable storage.
pub const FLAG_FUA: u8 = 1 << 0;
/// Write-zeroes must not deallocate.
pub const FLAG_NO_UNMAP: u8 = 1 << 1;

/// A piece of a scatter-gather list: `len` bytes at `offset` inside guest
/// memory region `region` (an index into the memory table both sides share).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Segment {
    pub region: u32,
    pub len: u32,
    pub offset: u64,
}

/// The request entry exactly as it lies in shared memory.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct RawRequest {
    pub tag: u32,
    pub op: u8,
    pub flags: u8,
    pub nseg: u16,
    pub offset: u64,
    pub len: u64,
    pub reserved: u64,
    pub inline: [Segment; INLINE_SEGMENTS],
}

/// The completion entry exactly as it lies in shared memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Completion {
    /// The request's tag.
    pub tag: u32,
    /// 0 on success, or a negative errno.
    pub result: i32,
    /// Op-specific value: the byte offset where a zone append landed, the
    /// bytes a zone report wrote.
    pub extra: u64,
}

const _: () = assert!(std::mem::size_of::<RawRequest>() == 64);
const _: () = assert!(std::mem::size_of::<Completion>() == 16);
const _: () = assert!(std::mem::size_of::<Segment>() == 16);

/// A validated request (its segments are returned separately).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub tag: u32,
    pub op: Op,
    pub flags: u8,
    /// Byte offset on the device.
    pub offset: u64,
    /// Byte length: the sum of the segments for data ops, the range length
    /// for discard / write-zeroes, 0 otherwise.
    pub len: u64,
}

/// Why a request entry was refused. `tag` is set when the tag itself was
/// valid, so the request can be failed back to the frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error("bad request entry (tag {tag:?}): {reason}")]
pub struct BadRequest {
    pub tag: Option<u32>,
    pub reason: &'static str,
}
