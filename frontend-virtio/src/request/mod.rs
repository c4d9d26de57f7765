//! Turning a virtio-blk descriptor chain into a ring request.
//!
//! Everything here reads guest-controlled bytes, so nothing is trusted: a
//! chain that the virtqueue iterator cut short (too long, out-of-range `next`,
//! bad indirect table) is malformed and refused, readable descriptors must
//! precede writable ones, every address range is translated through the
//! memory table, and sector ranges are checked against the capacity.
//!
//! - [`wire`]: the request header, request types and statuses as the guest
//!   writes and reads them.
//! - [`parse`](parse_with_zones): one function per request kind.
//! - [`walk_chain`]: a chain walked from its head, for inflight recovery.
//!
//! Zoned devices (VIRTIO_BLK_F_ZONED): [`parse_with_zones`] also takes zone
//! reports, zone management and zone appends; [`zoned_status_of`] turns the
//! ring's zone results into virtio-blk's zone statuses.

mod kinds;
mod walk;
pub mod wire;

use blkmesh_ipc::ring::{zone_status, Request, Segment};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend};

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};

use crate::memory::MemTable;

pub use walk::{walk_chain, WalkError};
pub use wire::{DiscardRange, RequestHeader, RequestType, Status};

const SECTOR: u64 = 512;
/// Bytes of the request header.
const HEADER: u64 = std::mem::size_of::<RequestHeader>() as u64;
/// Bytes of a GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Largest data request taken: seg_max × size_max as the device offers
/// them (ring segments × the largest segment).
pub const MAX_REQUEST_BYTES: u64 =
    crate::config::RING_MAX_SEGMENTS as u64 * crate::config::SIZE_MAX as u64;

/// What the device offers, for request checks. The atomics change when
/// the graph is reopened (resize, read-only switch); the queue threads are
/// drained and paused around such a change, so relaxed loads suffice.
#[derive(Debug)]
pub struct DeviceInfo {
    /// Bytes.
    pub capacity: AtomicU64,
    pub writable: AtomicBool,
    pub max_discard_sectors: AtomicU32,
    pub max_write_zeroes_sectors: AtomicU32,
    /// Most ring segments one request may use.
    pub max_segments: usize,
    pub serial: [u8; ID_BYTES],
    /// Per-queue statistics, kept for the export's lifetime so counts
    /// survive VMM reconnects.
    pub stats: Vec<std::sync::Arc<blkmesh_stats::IoCounters>>,
}

/// Bytes of a zone report's header (`struct virtio_blk_zone_report`
/// without its descriptors); a report buffer must hold at least this.
pub const ZONE_REPORT_HEADER: u64 = 64;
/// Bytes of the `append_sector` field a zone append returns before its
/// status byte.
pub const APPEND_SECTOR_BYTES: u64 = 8;

/// The zone geometry requests are checked against, for an export whose
/// graph is zoned. Separate from [`DeviceInfo`] because zone requests are
/// only taken on connections that negotiated VIRTIO_BLK_F_ZONED (see
/// [`parse_with_zones`]); atomics for the same reason as there (reopen).
#[derive(Debug, Default)]
pub struct ZoneLimits {
    /// Zone size in bytes; 0 = not zoned (zone requests are refused).
    pub zone_size: AtomicU64,
    /// `max_append_sectors` as offered (0 = appends not supported).
    pub max_append_sectors: AtomicU32,
}

impl ZoneLimits {
    /// What the device offers for `cfg`.
    pub fn update(&self, cfg: &crate::config::BlkConfig) {
        self.zone_size.store(cfg.zone_size(), Relaxed);
        self.max_append_sectors
            .store(cfg.max_append_sectors(), Relaxed);
    }
}

/// A descriptor as the chain yielded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
    pub has_next: bool,
}

/// Why a chain cannot even be answered (no place for a status byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("empty or unreadable descriptor chain")]
    Empty,
    #[error("descriptor chain cut short (loop, bad next index, bad indirect table or too long)")]
    Truncated,
    #[error("readable descriptor after a writable one")]
    Order,
    #[error("no writable status byte at the end of the chain")]
    NoStatus,
}

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

/// Checks the shape of a chain. `descs` is what the chain iterator yielded.
pub fn check_chain(descs: &[Desc]) -> Result<u64, ChainError> {
    let last = descs.last().ok_or(ChainError::Empty)?;
    if last.has_next {
        return Err(ChainError::Truncated);
    }
    let mut seen_writable = false;
    for d in descs {
        if !d.writable && seen_writable {
            return Err(ChainError::Order);
        }
        seen_writable |= d.writable;
    }
    if !last.writable || last.len == 0 {
        return Err(ChainError::NoStatus);
    }
    last.addr
        .checked_add(last.len as u64 - 1)
        .ok_or(ChainError::NoStatus)
}

/// Byte ranges `[skip, skip + take)` of the concatenation of the guest
/// buffers `descs` (address, length), appended to `out`.
pub fn byte_ranges(
    descs: impl Iterator<Item = (u64, u64)>,
    mut skip: u64,
    mut take: u64,
    out: &mut Vec<(u64, u64)>,
) {
    for (addr, len) in descs {
        if take == 0 {
            break;
        }
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(take);
        out.push((addr + skip, n));
        take -= n;
        skip = 0;
    }
}

/// The device-readable buffers of a chain, as (address, length).
fn readable(descs: &[Desc]) -> impl Iterator<Item = (u64, u64)> + '_ {
    descs
        .iter()
        .filter(|d| !d.writable)
        .map(|d| (d.addr, d.len as u64))
}

/// The device-writable buffers of a chain, as (address, length).
fn writable(descs: &[Desc]) -> impl Iterator<Item = (u64, u64)> + '_ {
    descs
        .iter()
        .filter(|d| d.writable)
        .map(|d| (d.addr, d.len as u64))
}

/// Reads the header from the first readable bytes of `descs`, through
/// `parts` (cleared first).
fn read_header<M: GuestMemoryBackend>(
    descs: &[Desc],
    mem: &M,
    parts: &mut Vec<(u64, u64)>,
) -> Option<RequestHeader> {
    parts.clear();
    byte_ranges(readable(descs), 0, HEADER, parts);
    let mut hdr = RequestHeader::default();
    read_exact(mem, parts, hdr.as_mut_slice()).then_some(hdr)
}

/// The header of a chain, if it has a readable one (a peek: [`parse`]
/// checks everything).
pub fn peek_header<M: GuestMemoryBackend>(descs: &[Desc], mem: &M) -> Option<RequestHeader> {
    read_header(descs, mem, &mut Vec::with_capacity(2))
}

fn read_exact<M: GuestMemoryBackend>(mem: &M, parts: &[(u64, u64)], buf: &mut [u8]) -> bool {
    let mut at = 0usize;
    for &(addr, len) in parts {
        let n = len as usize;
        if at + n > buf.len() {
            return false;
        }
        let dst = &mut buf[at..at + n];
        // Fast path: the range lies in one region (always, in practice);
        // the general path walks regions.
        let done = match mem.get_slice(GuestAddress(addr), n) {
            Ok(s) => s.copy_to(dst) == n,
            Err(_) => vm_memory::Bytes::read_slice(mem, dst, GuestAddress(addr)).is_ok(),
        };
        if !done {
            return false;
        }
        at += n;
    }
    at == buf.len()
}

/// Parses a well-shaped chain (see [`check_chain`]) into an action, for a
/// connection that did not negotiate VIRTIO_BLK_F_ZONED: zone requests are
/// refused with UNSUPP. Data segments go into `segs` (cleared first).
#[allow(clippy::too_many_arguments)]
pub fn parse<M: GuestMemoryBackend>(
    descs: &[Desc],
    status: u64,
    mem: &M,
    table: &MemTable,
    dev: &DeviceInfo,
    tag: u32,
    segs: &mut Vec<Segment>,
    parts: &mut Vec<(u64, u64)>,
) -> Parsed {
    parse_with_zones(descs, status, mem, table, dev, None, tag, segs, parts)
}

/// [`parse`], with `zones` set when the connection negotiated
/// VIRTIO_BLK_F_ZONED: zone requests are then taken if the graph is zoned
/// (virtio 1.3, 5.2.6, "Zoned Block Devices"):
///
/// - ZONE_APPEND: header, the data (device-readable), then exactly the
///   8-byte `append_sector` and the status byte (device-writable). The
///   sector must be a zone start; the data a non-zero multiple of 512 of
///   at most `max_append_sectors` (none offered: UNSUPP). On success the
///   queue writes `append_sector` (see [`Parsed::used_len`]).
/// - ZONE_REPORT: the sector lies in the first zone to report; the
///   device-writable bytes before the status (at least the 64-byte header)
///   receive the report, written by the worker.
/// - ZONE_OPEN / CLOSE / FINISH / RESET: the sector is a zone start;
///   ZONE_RESET_ALL ignores it. No data.
///
/// Out-of-range or misaligned zone addresses, and appends larger than
/// allowed, are ZONE_INVALID_CMD (as QEMU's virtio-blk answers them);
/// malformed buffers are IOERR; writes of any kind to a read-only device
/// are IOERR.
#[allow(clippy::too_many_arguments)]
pub fn parse_with_zones<M: GuestMemoryBackend>(
    descs: &[Desc],
    status: u64,
    mem: &M,
    table: &MemTable,
    dev: &DeviceInfo,
    zones: Option<&ZoneLimits>,
    tag: u32,
    segs: &mut Vec<Segment>,
    parts: &mut Vec<(u64, u64)>,
) -> Parsed {
    segs.clear();
    let readable_len: u64 = readable(descs).map(|(_, l)| l).sum();
    let header = read_header(descs, mem, parts).filter(|_| readable_len >= HEADER);
    parts.clear();
    let Some(header) = header else {
        return Parsed {
            status,
            used_len: 1,
            action: Action::Complete(Status::IoErr),
            request_type: None,
        };
    };
    let request_type = header.request_type();
    let chain = kinds::Chain {
        descs,
        status,
        table,
        dev,
        tag,
        request_type,
        sector: header.sector(),
        readable_len,
        // Writable bytes excluding the status byte.
        writable_len: writable(descs).map(|(_, l)| l).sum::<u64>() - 1,
        capacity: dev.capacity.load(Relaxed),
        dev_writable: dev.writable.load(Relaxed),
    };
    let Some(kind) = request_type else {
        return chain.complete(Status::Unsupp);
    };
    match kind {
        RequestType::In => chain.read(segs, parts),
        RequestType::Out => chain.write(segs, parts),
        RequestType::Flush => chain.flush(),
        RequestType::GetId => chain.get_id(mem, parts),
        RequestType::Discard | RequestType::WriteZeroes => {
            chain.discard_or_write_zeroes(mem, kind, parts)
        }
        // Refused unless ZONED was negotiated and the graph is zoned.
        _ => match zones.filter(|z| z.zone_size.load(Relaxed) != 0) {
            None => chain.complete(Status::Unsupp),
            Some(zones) => match kind {
                RequestType::ZoneReport => chain.zone_report(zones, segs, parts),
                RequestType::ZoneAppend => chain.zone_append(zones, segs, parts),
                _ => chain.zone_management(zones, kind),
            },
        },
    }
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
/// ([`blkmesh_ipc::ring::zone_status`]) become the zone statuses, for
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
mod tests;
