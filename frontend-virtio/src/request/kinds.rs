//! One function per request kind: each checks its chain against the
//! device and turns it into a ring request or an immediate status.

use std::sync::atomic::Ordering::Relaxed;

use blkmesh_ipc::ring::{Op, Request, Segment, FLAG_NO_UNMAP};
use virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use super::chain::{byte_ranges, read_exact, readable, writable, Desc};
use super::limits::{
    DeviceInfo, ZoneLimits, APPEND_SECTOR_BYTES, ID_BYTES, MAX_REQUEST_BYTES, SECTOR,
    ZONE_REPORT_HEADER,
};
use super::wire::{DiscardRange, RequestType, Status, HEADER};
use crate::memory::MemTable;

/// The outcome of parsing one chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Guest address of the status byte.
    pub status: u64,
    /// Bytes written into the chain on success (data + status).
    pub used_len: u32,
    pub action: Action,
    /// The request's type, `None` if the header could not be read or
    /// names a type the device does not know; for statistics of requests
    /// answered at once.
    pub request_type: Option<RequestType>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Forward to the worker; its segments were appended to the caller's vec.
    Submit(Request),
    /// Answer now with this status (already handled, or refused).
    Complete(Status),
}

/// Turns guest byte ranges into ring segments; false (with `segs`
/// cleared) when one is outside guest memory or there are more than `max`.
fn to_segments(
    table: &MemTable,
    parts: &[(u64, u64)],
    segs: &mut Vec<Segment>,
    max: usize,
) -> bool {
    for &(addr, n) in parts {
        if !table.segments(addr, n, segs) {
            segs.clear();
            return false;
        }
    }
    if segs.len() > max {
        segs.clear();
        return false;
    }
    true
}

/// A well-shaped chain whose header was read, and what it is checked
/// against.
pub(super) struct Chain<'a> {
    pub descs: &'a [Desc],
    /// Guest address of the status byte.
    pub status: u64,
    pub table: &'a MemTable,
    pub dev: &'a DeviceInfo,
    pub tag: u32,
    pub request_type: Option<RequestType>,
    pub sector: u64,
    /// Device-readable bytes, header included.
    pub readable_len: u64,
    /// Device-writable bytes, status byte excluded.
    pub writable_len: u64,
    pub capacity: u64,
    pub dev_writable: bool,
}

impl Chain<'_> {
    /// Answered at once with `status`.
    pub fn complete(&self, status: Status) -> Parsed {
        Parsed {
            status: self.status,
            used_len: 1,
            action: Action::Complete(status),
            request_type: self.request_type,
        }
    }

    /// Passed to the worker; `used_len` bytes are written on success.
    fn submit(&self, op: Op, flags: u8, offset: u64, len: u64, used_len: u64) -> Parsed {
        Parsed {
            status: self.status,
            used_len: used_len as u32,
            action: Action::Submit(Request {
                tag: self.tag,
                op,
                flags,
                offset,
                len,
            }),
            request_type: self.request_type,
        }
    }

    fn in_range(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.capacity)
    }

    /// The data bytes after the header.
    fn data_len(&self) -> u64 {
        self.readable_len - HEADER
    }

    /// Maps bytes `[skip, skip + len)` of `buffers` to ring segments (into
    /// `segs`, through `parts`); false when some are outside guest memory
    /// or there are more than a request may use.
    fn map(
        &self,
        buffers: impl Iterator<Item = (u64, u64)>,
        skip: u64,
        len: u64,
        segs: &mut Vec<Segment>,
        parts: &mut Vec<(u64, u64)>,
    ) -> bool {
        byte_ranges(buffers, skip, len, parts);
        to_segments(self.table, parts, segs, self.dev.max_segments)
    }

    /// VIRTIO_BLK_T_IN: the device-writable bytes before the status.
    pub fn read(&self, segs: &mut Vec<Segment>, parts: &mut Vec<(u64, u64)>) -> Parsed {
        self.data(true, self.writable_len, segs, parts)
    }

    /// VIRTIO_BLK_T_OUT: the device-readable bytes after the header.
    pub fn write(&self, segs: &mut Vec<Segment>, parts: &mut Vec<(u64, u64)>) -> Parsed {
        self.data(false, self.data_len(), segs, parts)
    }

    fn data(
        &self,
        is_read: bool,
        len: u64,
        segs: &mut Vec<Segment>,
        parts: &mut Vec<(u64, u64)>,
    ) -> Parsed {
        let Some(offset) = self.sector.checked_mul(SECTOR) else {
            return self.complete(Status::IoErr);
        };
        // Beyond what seg_max × size_max allows a driver to send: a
        // worker would have to bounce an unbounded buffer for it.
        if len % SECTOR != 0 || !self.in_range(offset, len) || len > MAX_REQUEST_BYTES {
            return self.complete(Status::IoErr);
        }
        if !is_read && !self.dev_writable {
            return self.complete(Status::IoErr);
        }
        if len == 0 {
            return self.complete(Status::Ok);
        }
        let mapped = if is_read {
            self.map(writable(self.descs), 0, len, segs, parts)
        } else {
            self.map(readable(self.descs), HEADER, len, segs, parts)
        };
        if !mapped {
            return self.complete(Status::IoErr);
        }
        let (op, used_len) = if is_read {
            (Op::Read, len + 1)
        } else {
            (Op::Write, 1)
        };
        self.submit(op, 0, offset, len, used_len)
    }

    /// VIRTIO_BLK_T_FLUSH.
    pub fn flush(&self) -> Parsed {
        self.submit(Op::Flush, 0, 0, 0, 1)
    }

    /// VIRTIO_BLK_T_GET_ID: answered here, with as much of the serial as
    /// the buffer holds.
    pub fn get_id<M: GuestMemoryBackend>(&self, mem: &M, parts: &mut Vec<(u64, u64)>) -> Parsed {
        let n = self.writable_len.min(ID_BYTES as u64);
        byte_ranges(writable(self.descs), 0, n, parts);
        let mut at = 0usize;
        for &(addr, len) in parts.iter() {
            let bytes = &self.dev.serial[at..at + len as usize];
            if mem.write_slice(bytes, GuestAddress(addr)).is_err() {
                return self.complete(Status::IoErr);
            }
            at += len as usize;
        }
        Parsed {
            used_len: n as u32 + 1,
            ..self.complete(Status::Ok)
        }
    }

    /// VIRTIO_BLK_T_DISCARD and VIRTIO_BLK_T_WRITE_ZEROES: one range.
    pub fn discard_or_write_zeroes<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        kind: RequestType,
        parts: &mut Vec<(u64, u64)>,
    ) -> Parsed {
        let is_discard = kind == RequestType::Discard;
        let range_bytes = std::mem::size_of::<DiscardRange>() as u64;
        // One range per request: we offer max_*_seg = 1.
        if self.data_len() != range_bytes {
            return self.complete(Status::IoErr);
        }
        byte_ranges(readable(self.descs), HEADER, range_bytes, parts);
        let mut range = DiscardRange::default();
        if !read_exact(mem, parts, range.as_mut_slice()) {
            return self.complete(Status::IoErr);
        }
        let (start, num, flags) = (
            range.sector.to_native(),
            range.num_sectors.to_native(),
            range.flags.to_native(),
        );
        let allowed = if is_discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if flags & !allowed != 0 {
            return self.complete(Status::Unsupp);
        }
        let max = if is_discard {
            self.dev.max_discard_sectors.load(Relaxed)
        } else {
            self.dev.max_write_zeroes_sectors.load(Relaxed)
        };
        let (Some(offset), len) = (start.checked_mul(SECTOR), num as u64 * SECTOR) else {
            return self.complete(Status::IoErr);
        };
        if !self.dev_writable || num == 0 || num > max || !self.in_range(offset, len) {
            return self.complete(Status::IoErr);
        }
        if is_discard {
            self.submit(Op::Discard, 0, offset, len, 1)
        } else {
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            let flags = if unmap { 0 } else { FLAG_NO_UNMAP };
            self.submit(Op::WriteZeroes, flags, offset, len, 1)
        }
    }

    /// The byte offset of the zone start at `sector`, if it is one.
    fn zone_start(&self, zones: &ZoneLimits, sector: u64) -> Option<u64> {
        let zone_size = zones.zone_size.load(Relaxed);
        sector
            .checked_mul(SECTOR)
            .filter(|&o| o < self.capacity && o % zone_size == 0)
    }

    /// VIRTIO_BLK_T_ZONE_REPORT: the worker writes the report into the
    /// device-writable bytes before the status.
    pub fn zone_report(
        &self,
        _zones: &ZoneLimits,
        segs: &mut Vec<Segment>,
        parts: &mut Vec<(u64, u64)>,
    ) -> Parsed {
        let Some(offset) = self
            .sector
            .checked_mul(SECTOR)
            .filter(|&o| o < self.capacity)
        else {
            return self.complete(Status::ZoneInvalidCmd);
        };
        if self.writable_len < ZONE_REPORT_HEADER {
            return self.complete(Status::ZoneInvalidCmd);
        }
        // A larger buffer than a request may carry just gets fewer zones.
        let len = self.writable_len.min(MAX_REQUEST_BYTES);
        if offset.checked_add(len).is_none() {
            return self.complete(Status::ZoneInvalidCmd);
        }
        if !self.map(writable(self.descs), 0, len, segs, parts) {
            return self.complete(Status::IoErr);
        }
        // used_len is the most the report may take; the queue replaces it
        // with what the worker wrote.
        self.submit(Op::ZoneReport, 0, offset, len, len + 1)
    }

    /// VIRTIO_BLK_T_ZONE_APPEND: data at a zone's write pointer; the
    /// queue writes back where it landed.
    pub fn zone_append(
        &self,
        zones: &ZoneLimits,
        segs: &mut Vec<Segment>,
        parts: &mut Vec<(u64, u64)>,
    ) -> Parsed {
        let len = self.data_len();
        if !self.dev_writable || self.writable_len != APPEND_SECTOR_BYTES {
            return self.complete(Status::IoErr);
        }
        let max = zones.max_append_sectors.load(Relaxed) as u64;
        if max == 0 {
            return self.complete(Status::Unsupp);
        }
        if len == 0 || len % SECTOR != 0 {
            return self.complete(Status::IoErr);
        }
        let Some(offset) = self.zone_start(zones, self.sector) else {
            return self.complete(Status::ZoneInvalidCmd);
        };
        if len > max * SECTOR || !self.in_range(offset, len) || len > MAX_REQUEST_BYTES {
            return self.complete(Status::ZoneInvalidCmd);
        }
        if !self.map(readable(self.descs), HEADER, len, segs, parts) {
            return self.complete(Status::IoErr);
        }
        self.submit(Op::ZoneAppend, 0, offset, len, APPEND_SECTOR_BYTES + 1)
    }

    /// VIRTIO_BLK_T_ZONE_OPEN / CLOSE / FINISH / RESET (at a zone start)
    /// and RESET_ALL.
    pub fn zone_management(&self, zones: &ZoneLimits, kind: RequestType) -> Parsed {
        if !self.dev_writable {
            return self.complete(Status::IoErr);
        }
        let op = match kind {
            RequestType::ZoneOpen => Op::ZoneOpen,
            RequestType::ZoneClose => Op::ZoneClose,
            RequestType::ZoneFinish => Op::ZoneFinish,
            RequestType::ZoneReset => Op::ZoneReset,
            _ => Op::ZoneResetAll,
        };
        let offset = if op == Op::ZoneResetAll {
            0
        } else {
            match self.zone_start(zones, self.sector) {
                Some(o) => o,
                None => return self.complete(Status::ZoneInvalidCmd),
            }
        };
        self.submit(op, 0, offset, 0, 1)
    }
}
