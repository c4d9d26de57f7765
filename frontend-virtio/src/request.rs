//! Turning a virtio-blk descriptor chain into a ring request.
//!
//! Everything here reads guest-controlled bytes, so nothing is trusted: a
//! chain that the virtqueue iterator cut short (too long, out-of-range `next`,
//! bad indirect table) is malformed and refused, readable descriptors must
//! precede writable ones, every address range is translated through the
//! memory table, and sector ranges are checked against the capacity.
//!
//! Zoned devices (VIRTIO_BLK_F_ZONED): [`parse_with_zones`] also takes zone
//! reports, zone management and zone appends; [`zoned_status_of`] turns the
//! ring's zone results into virtio-blk's zone statuses.

use blkmesh_ipc::ring::{zone_status, Op, Request, Segment, FLAG_NO_UNMAP};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_S_ZONE_ACTIVE_RESOURCE,
    VIRTIO_BLK_S_ZONE_INVALID_CMD, VIRTIO_BLK_S_ZONE_OPEN_RESOURCE, VIRTIO_BLK_S_ZONE_UNALIGNED_WP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_T_ZONE_APPEND, VIRTIO_BLK_T_ZONE_CLOSE,
    VIRTIO_BLK_T_ZONE_FINISH, VIRTIO_BLK_T_ZONE_OPEN, VIRTIO_BLK_T_ZONE_REPORT,
    VIRTIO_BLK_T_ZONE_RESET, VIRTIO_BLK_T_ZONE_RESET_ALL, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};

use crate::memory::MemTable;

const SECTOR: u64 = 512;
const HEADER: u64 = 16;
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

/// Why a descriptor chain could not be walked from its head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("descriptor index {0} outside the table")]
    Index(u16),
    #[error("descriptor table entry not in guest memory")]
    Unreadable,
    #[error("bad indirect descriptor")]
    Indirect,
    #[error("chain longer than its table (a loop?)")]
    Loop,
}

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// Walks the split-ring descriptor chain that starts at `head` in the table
/// at `desc_table` (`queue_size` entries), following one indirect table, as
/// the virtio-queue crate's iterator would. Used to take up again the heads
/// an earlier frontend left in flight (inflight tracking); every read is
/// bounds-checked through guest memory and the walk is bounded.
pub fn walk_chain<M: GuestMemoryBackend>(
    mem: &M,
    desc_table: u64,
    queue_size: u16,
    head: u16,
    out: &mut Vec<Desc>,
) -> Result<(), WalkError> {
    out.clear();
    let (mut table, mut size, mut index) = (desc_table, queue_size as u32, head as u32);
    let mut indirect = false;
    let mut steps = 0u32;
    loop {
        if index >= size {
            return Err(WalkError::Index(index as u16));
        }
        let mut raw = [0u8; 16];
        let at = table
            .checked_add(index as u64 * 16)
            .ok_or(WalkError::Unreadable)?;
        mem.read_slice(&mut raw, GuestAddress(at))
            .map_err(|_| WalkError::Unreadable)?;
        let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
        let flags = u16::from_le_bytes([raw[12], raw[13]]);
        let next = u16::from_le_bytes([raw[14], raw[15]]);
        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            // Only one level, never chained, a whole number of entries,
            // no longer than the queue (a driver may not make a chain
            // longer than the queue size).
            if indirect
                || flags & VIRTQ_DESC_F_NEXT != 0
                || len == 0
                || len % 16 != 0
                || len / 16 > queue_size as u32
            {
                return Err(WalkError::Indirect);
            }
            (table, size, index, indirect) = (addr, len / 16, 0, true);
            continue;
        }
        steps += 1;
        if steps > size {
            return Err(WalkError::Loop);
        }
        out.push(Desc {
            addr,
            len,
            writable: flags & VIRTQ_DESC_F_WRITE != 0,
            has_next: flags & VIRTQ_DESC_F_NEXT != 0,
        });
        if flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(());
        }
        index = next as u32;
    }
}

/// The statistics kind of a virtio request type (GET_ID and unknown
/// types have none).
pub fn op_kind(request_type: u32) -> Option<blkmesh_stats::OpKind> {
    use blkmesh_stats::OpKind;
    match request_type {
        VIRTIO_BLK_T_IN => Some(OpKind::Read),
        VIRTIO_BLK_T_OUT => Some(OpKind::Write),
        VIRTIO_BLK_T_FLUSH => Some(OpKind::Flush),
        VIRTIO_BLK_T_DISCARD => Some(OpKind::Discard),
        VIRTIO_BLK_T_WRITE_ZEROES => Some(OpKind::WriteZeroes),
        // An append is a write; zone reports and zone management have no
        // kind of their own and are not counted.
        VIRTIO_BLK_T_ZONE_APPEND => Some(OpKind::Write),
        _ => None,
    }
}

/// Whether `request_type` is one of the zoned-device requests.
pub fn is_zone_request(request_type: u32) -> bool {
    matches!(
        request_type,
        VIRTIO_BLK_T_ZONE_APPEND
            | VIRTIO_BLK_T_ZONE_REPORT
            | VIRTIO_BLK_T_ZONE_OPEN
            | VIRTIO_BLK_T_ZONE_CLOSE
            | VIRTIO_BLK_T_ZONE_FINISH
            | VIRTIO_BLK_T_ZONE_RESET
            | VIRTIO_BLK_T_ZONE_RESET_ALL
    )
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
    /// The request's virtio type (VIRTIO_BLK_T_*), `u32::MAX` if the header
    /// could not be read; for statistics of requests answered at once.
    pub request_type: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Forward to the worker; its segments were appended to the caller's vec.
    Submit(Request),
    /// Answer now with this status (already handled, or refused).
    Complete(u8),
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

/// Byte ranges `[skip, skip + take)` of the concatenation of `descs`.
fn ranges(
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

/// Byte ranges `[skip, skip + take)` of the concatenation of the guest
/// buffers `descs` (address, length), appended to `out`.
pub fn byte_ranges(
    descs: impl Iterator<Item = (u64, u64)>,
    skip: u64,
    take: u64,
    out: &mut Vec<(u64, u64)>,
) {
    ranges(descs, skip, take, out)
}

/// The request type and sector of a chain's header, if it has a readable
/// one (a peek: [`parse`] checks everything).
pub fn peek_header<M: GuestMemoryBackend>(descs: &[Desc], mem: &M) -> Option<(u32, u64)> {
    let mut parts = Vec::with_capacity(2);
    let readable = descs
        .iter()
        .filter(|d| !d.writable)
        .map(|d| (d.addr, d.len as u64));
    ranges(readable, 0, HEADER, &mut parts);
    let mut hdr = [0u8; HEADER as usize];
    if !read_exact(mem, &parts, &mut hdr) {
        return None;
    }
    let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or([0; 8]));
    Some((kind, sector))
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
            Err(_) => mem.read_slice(dst, GuestAddress(addr)).is_ok(),
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
    parts.clear();
    let complete = |s: u32| Parsed {
        status,
        used_len: 1,
        action: Action::Complete(s as u8),
        request_type: u32::MAX,
    };
    let readable = || {
        descs
            .iter()
            .filter(|d| !d.writable)
            .map(|d| (d.addr, d.len as u64))
    };
    let readable_len: u64 = readable().map(|(_, l)| l).sum();
    // Writable bytes excluding the status byte.
    let writable_len: u64 = descs
        .iter()
        .filter(|d| d.writable)
        .map(|d| d.len as u64)
        .sum::<u64>()
        - 1;
    let writable = || {
        descs
            .iter()
            .filter(|d| d.writable)
            .map(|d| (d.addr, d.len as u64))
    };

    ranges(readable(), 0, HEADER, parts);
    let mut hdr = [0u8; HEADER as usize];
    if readable_len < HEADER || !read_exact(mem, parts, &mut hdr) {
        return complete(VIRTIO_BLK_S_IOERR);
    }
    let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or([0; 8]));
    parts.clear();
    let complete = |s: u32| Parsed {
        request_type: kind,
        ..complete(s)
    };

    let capacity = dev.capacity.load(Relaxed);
    let dev_writable = dev.writable.load(Relaxed);
    let in_range =
        |offset: u64, len: u64| offset.checked_add(len).is_some_and(|end| end <= capacity);

    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let is_read = kind == VIRTIO_BLK_T_IN;
            let len = if is_read {
                writable_len
            } else {
                readable_len - HEADER
            };
            let Some(offset) = sector.checked_mul(SECTOR) else {
                return complete(VIRTIO_BLK_S_IOERR);
            };
            // Beyond what seg_max × size_max allows a driver to send: a
            // worker would have to bounce an unbounded buffer for it.
            if len % SECTOR != 0 || !in_range(offset, len) || len > MAX_REQUEST_BYTES {
                return complete(VIRTIO_BLK_S_IOERR);
            }
            if !is_read && !dev_writable {
                return complete(VIRTIO_BLK_S_IOERR);
            }
            if len == 0 {
                return complete(VIRTIO_BLK_S_OK);
            }
            if is_read {
                ranges(writable(), 0, len, parts);
            } else {
                ranges(readable(), HEADER, len, parts);
            }
            for &(addr, n) in parts.iter() {
                if !table.segments(addr, n, segs) {
                    segs.clear();
                    return complete(VIRTIO_BLK_S_IOERR);
                }
            }
            if segs.len() > dev.max_segments {
                segs.clear();
                return complete(VIRTIO_BLK_S_IOERR);
            }
            Parsed {
                request_type: kind,
                status,
                used_len: if is_read { len as u32 + 1 } else { 1 },
                action: Action::Submit(Request {
                    tag,
                    op: if is_read { Op::Read } else { Op::Write },
                    flags: 0,
                    offset,
                    len,
                }),
            }
        }
        VIRTIO_BLK_T_FLUSH => Parsed {
            request_type: kind,
            status,
            used_len: 1,
            action: Action::Submit(Request {
                tag,
                op: Op::Flush,
                flags: 0,
                offset: 0,
                len: 0,
            }),
        },
        VIRTIO_BLK_T_GET_ID => {
            let n = writable_len.min(ID_BYTES as u64);
            ranges(writable(), 0, n, parts);
            let mut at = 0usize;
            for &(addr, len) in parts.iter() {
                let bytes = &dev.serial[at..at + len as usize];
                if mem.write_slice(bytes, GuestAddress(addr)).is_err() {
                    return complete(VIRTIO_BLK_S_IOERR);
                }
                at += len as usize;
            }
            Parsed {
                request_type: kind,
                status,
                used_len: n as u32 + 1,
                action: Action::Complete(VIRTIO_BLK_S_OK as u8),
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let is_discard = kind == VIRTIO_BLK_T_DISCARD;
            // One 16-byte range per request: we offer max_*_seg = 1.
            if readable_len - HEADER != 16 {
                return complete(VIRTIO_BLK_S_IOERR);
            }
            ranges(readable(), HEADER, 16, parts);
            let mut seg = [0u8; 16];
            if !read_exact(mem, parts, &mut seg) {
                return complete(VIRTIO_BLK_S_IOERR);
            }
            let start = u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8]));
            let num = u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4]));
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or([0; 4]));
            let allowed = if is_discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !allowed != 0 {
                return complete(VIRTIO_BLK_S_UNSUPP);
            }
            let max = if is_discard {
                dev.max_discard_sectors.load(Relaxed)
            } else {
                dev.max_write_zeroes_sectors.load(Relaxed)
            };
            let (Some(offset), len) = (start.checked_mul(SECTOR), num as u64 * SECTOR) else {
                return complete(VIRTIO_BLK_S_IOERR);
            };
            if !dev_writable || num == 0 || num > max || !in_range(offset, len) {
                return complete(VIRTIO_BLK_S_IOERR);
            }
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            Parsed {
                request_type: kind,
                status,
                used_len: 1,
                action: Action::Submit(Request {
                    tag,
                    op: if is_discard {
                        Op::Discard
                    } else {
                        Op::WriteZeroes
                    },
                    flags: if !is_discard && !unmap {
                        FLAG_NO_UNMAP
                    } else {
                        0
                    },
                    offset,
                    len,
                }),
            }
        }
        t if is_zone_request(t) => {
            // Refused unless ZONED was negotiated and the graph is zoned.
            let zone_size = zones.map_or(0, |z| z.zone_size.load(Relaxed));
            if zone_size == 0 {
                return complete(VIRTIO_BLK_S_UNSUPP);
            }
            let invalid = || complete(VIRTIO_BLK_S_ZONE_INVALID_CMD);
            // The byte offset of a zone start inside the device.
            let zone_start = |sector: u64| {
                sector
                    .checked_mul(SECTOR)
                    .filter(|&o| o < capacity && o % zone_size == 0)
            };
            let submit = |op: Op, offset: u64, len: u64, used_len: u64| Parsed {
                request_type: kind,
                status,
                used_len: used_len as u32,
                action: Action::Submit(Request {
                    tag,
                    op,
                    flags: 0,
                    offset,
                    len,
                }),
            };
            match t {
                VIRTIO_BLK_T_ZONE_REPORT => {
                    let Some(offset) = sector.checked_mul(SECTOR).filter(|&o| o < capacity) else {
                        return invalid();
                    };
                    if writable_len < ZONE_REPORT_HEADER {
                        return invalid();
                    }
                    // A larger buffer than a request may carry just gets
                    // fewer zones.
                    let len = writable_len.min(MAX_REQUEST_BYTES);
                    if offset.checked_add(len).is_none() {
                        return invalid();
                    }
                    ranges(writable(), 0, len, parts);
                    if !to_segments(table, parts, segs, dev.max_segments) {
                        return complete(VIRTIO_BLK_S_IOERR);
                    }
                    // used_len is the most the report may take; the queue
                    // replaces it with what the worker wrote.
                    submit(Op::ZoneReport, offset, len, len + 1)
                }
                VIRTIO_BLK_T_ZONE_APPEND => {
                    let len = readable_len - HEADER;
                    if !dev_writable || writable_len != APPEND_SECTOR_BYTES {
                        return complete(VIRTIO_BLK_S_IOERR);
                    }
                    let max = zones.map_or(0, |z| z.max_append_sectors.load(Relaxed)) as u64;
                    if max == 0 {
                        return complete(VIRTIO_BLK_S_UNSUPP);
                    }
                    if len == 0 || len % SECTOR != 0 {
                        return complete(VIRTIO_BLK_S_IOERR);
                    }
                    let Some(offset) = zone_start(sector) else {
                        return invalid();
                    };
                    if len > max * SECTOR || !in_range(offset, len) || len > MAX_REQUEST_BYTES {
                        return invalid();
                    }
                    ranges(readable(), HEADER, len, parts);
                    if !to_segments(table, parts, segs, dev.max_segments) {
                        return complete(VIRTIO_BLK_S_IOERR);
                    }
                    submit(Op::ZoneAppend, offset, len, APPEND_SECTOR_BYTES + 1)
                }
                _ => {
                    if !dev_writable {
                        return complete(VIRTIO_BLK_S_IOERR);
                    }
                    let op = match t {
                        VIRTIO_BLK_T_ZONE_OPEN => Op::ZoneOpen,
                        VIRTIO_BLK_T_ZONE_CLOSE => Op::ZoneClose,
                        VIRTIO_BLK_T_ZONE_FINISH => Op::ZoneFinish,
                        VIRTIO_BLK_T_ZONE_RESET => Op::ZoneReset,
                        _ => Op::ZoneResetAll,
                    };
                    let offset = if op == Op::ZoneResetAll {
                        0
                    } else {
                        match zone_start(sector) {
                            Some(o) => o,
                            None => return invalid(),
                        }
                    };
                    submit(op, offset, 0, 1)
                }
            }
        }
        _ => complete(VIRTIO_BLK_S_UNSUPP),
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
pub fn status_of(result: i32) -> u8 {
    // The worker is not trusted: any value, i32::MIN included, maps.
    match result {
        0 => VIRTIO_BLK_S_OK as u8,
        r if r == -libc::EOPNOTSUPP => VIRTIO_BLK_S_UNSUPP as u8,
        _ => VIRTIO_BLK_S_IOERR as u8,
    }
}

/// The virtio status for a worker's result on a connection that
/// negotiated VIRTIO_BLK_F_ZONED: the ring's zone results
/// ([`blkmesh_ipc::ring::zone_status`]) become the zone statuses, for
/// every request type (writes to a zone fail with them too).
pub fn zoned_status_of(result: i32) -> u8 {
    (match result {
        zone_status::INVALID_CMD => VIRTIO_BLK_S_ZONE_INVALID_CMD,
        zone_status::UNALIGNED_WP => VIRTIO_BLK_S_ZONE_UNALIGNED_WP,
        zone_status::OPEN_RESOURCE => VIRTIO_BLK_S_ZONE_OPEN_RESOURCE,
        zone_status::ACTIVE_RESOURCE => VIRTIO_BLK_S_ZONE_ACTIVE_RESOURCE,
        r => return status_of(r),
    }) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RegionDesc;
    use std::fs::File;

    const MEM: u64 = 1 << 20;

    fn setup() -> MemTable {
        let f: File = tempfile::tempfile().unwrap();
        f.set_len(MEM).unwrap();
        MemTable::new(
            &[RegionDesc {
                gpa: 0,
                size: MEM,
                vmm_addr: 0x1000_0000,
                fd_offset: 0,
            }],
            vec![f],
        )
        .unwrap()
    }

    fn dev() -> DeviceInfo {
        DeviceInfo {
            capacity: AtomicU64::new(1 << 20),
            writable: AtomicBool::new(true),
            max_discard_sectors: AtomicU32::new(2048),
            max_write_zeroes_sectors: AtomicU32::new(2048),
            max_segments: 8,
            serial: *b"serial-0123456789abc",
            stats: vec![],
        }
    }

    fn d(addr: u64, len: u32, writable: bool, has_next: bool) -> Desc {
        Desc {
            addr,
            len,
            writable,
            has_next,
        }
    }

    fn header(t: &MemTable, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        t.guest_memory().write_slice(&h, GuestAddress(0)).unwrap();
    }

    fn run(t: &MemTable, descs: &[Desc]) -> (Parsed, Vec<Segment>) {
        let status = check_chain(descs).unwrap();
        let mut segs = vec![];
        let p = parse(
            descs,
            status,
            t.guest_memory(),
            t,
            &dev(),
            7,
            &mut segs,
            &mut vec![],
        );
        (p, segs)
    }

    #[test]
    fn read_becomes_one_segment_per_data_descriptor() {
        let t = setup();
        header(&t, VIRTIO_BLK_T_IN, 8);
        let (p, segs) = run(
            &t,
            &[
                d(0, 16, false, true),
                d(4096, 4096, true, true),
                d(0x3000, 512, true, true),
                d(100, 1, true, false),
            ],
        );
        assert_eq!(p.used_len, 4096 + 512 + 1);
        assert_eq!(
            p.action,
            Action::Submit(Request {
                tag: 7,
                op: Op::Read,
                flags: 0,
                offset: 4096,
                len: 4608
            })
        );
        assert_eq!(segs.len(), 2);
        assert_eq!(p.status, 100);
    }

    #[test]
    fn header_and_data_may_share_a_descriptor() {
        let t = setup();
        header(&t, VIRTIO_BLK_T_OUT, 0);
        let (p, segs) = run(&t, &[d(0, 16 + 512, false, true), d(600, 1, true, false)]);
        assert!(matches!(
            p.action,
            Action::Submit(Request {
                op: Op::Write,
                len: 512,
                ..
            })
        ));
        assert_eq!(segs[0].offset, 16);
    }

    #[test]
    fn rejects_truncated_chain() {
        assert_eq!(
            check_chain(&[d(0, 16, false, true)]),
            Err(ChainError::Truncated)
        );
        assert_eq!(check_chain(&[]), Err(ChainError::Empty));
    }

    #[test]
    fn rejects_readable_after_writable() {
        assert_eq!(
            check_chain(&[
                d(0, 16, false, true),
                d(16, 512, true, true),
                d(600, 1, false, false)
            ]),
            Err(ChainError::Order)
        );
    }

    #[test]
    fn rejects_chain_without_status() {
        assert_eq!(
            check_chain(&[d(0, 16, false, false)]),
            Err(ChainError::NoStatus)
        );
    }

    #[test]
    fn read_past_capacity_is_ioerr() {
        let t = setup();
        header(&t, VIRTIO_BLK_T_IN, 2047);
        let (p, _) = run(
            &t,
            &[
                d(0, 16, false, true),
                d(4096, 1024, true, true),
                d(100, 1, true, false),
            ],
        );
        assert_eq!(p.action, Action::Complete(VIRTIO_BLK_S_IOERR as u8));
        header(&t, VIRTIO_BLK_T_IN, u64::MAX / 256);
        let (p, _) = run(
            &t,
            &[
                d(0, 16, false, true),
                d(4096, 512, true, true),
                d(100, 1, true, false),
            ],
        );
        assert_eq!(p.action, Action::Complete(VIRTIO_BLK_S_IOERR as u8));
    }

    #[test]
    fn writes_to_read_only_device_are_ioerr() {
        let t = setup();
        let ro = dev();
        ro.writable.store(false, Relaxed);
        for kind in [
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ] {
            header(&t, kind, 0);
            let descs = [d(0, 32, false, true), d(100, 1, true, false)];
            let status = check_chain(&descs).unwrap();
            let p = parse(
                &descs,
                status,
                t.guest_memory(),
                &t,
                &ro,
                1,
                &mut vec![],
                &mut vec![],
            );
            assert_eq!(
                p.action,
                Action::Complete(VIRTIO_BLK_S_IOERR as u8),
                "type {kind}"
            );
        }
    }

    #[test]
    fn misaligned_length_is_ioerr() {
        let t = setup();
        header(&t, VIRTIO_BLK_T_IN, 0);
        let (p, _) = run(
            &t,
            &[
                d(0, 16, false, true),
                d(4096, 100, true, true),
                d(100, 1, true, false),
            ],
        );
        assert_eq!(p.action, Action::Complete(VIRTIO_BLK_S_IOERR as u8));
    }

    #[test]
    fn data_outside_guest_memory_is_ioerr() {
        let t = setup();
        header(&t, VIRTIO_BLK_T_IN, 0);
        let (p, _) = run(
            &t,
            &[
                d(0, 16, false, true),
                d(MEM - 256, 512, true, true),
                d(100, 1, true, false),
            ],
        );
        assert_eq!(p.action, Action::Complete(VIRTIO_BLK_S_IOERR as u8));
    }

    #[test]
    fn unknown_type_is_unsupported() {
        let t = setup();
        header(&t, 0x77, 0);
        let (p, _) = run(&t, &[d(0, 16, false, true), d(100, 1, true, false)]);
        assert_eq!(p.action, Action::Complete(VIRTIO_BLK_S_UNSUPP as u8));
    }

    #[test]
    fn get_id_writes_the_serial() {
        let t = setup();
        header(&t, VIRTIO_BLK_T_GET_ID, 0);
        let (p, _) = run(
            &t,
            &[
                d(0, 16, false, true),
                d(4096, 20, true, true),
                d(100, 1, true, false),
            ],
        );
        assert_eq!(p.action, Action::Complete(0));
        let mut id = [0u8; 20];
        t.guest_memory()
            .read_slice(&mut id, GuestAddress(4096))
            .unwrap();
        assert_eq!(&id, b"serial-0123456789abc");
    }

    #[test]
    fn write_zeroes_carries_unmap_choice() {
        let t = setup();
        header(&t, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&8u64.to_le_bytes());
        seg[8..12].copy_from_slice(&16u32.to_le_bytes());
        t.guest_memory()
            .write_slice(&seg, GuestAddress(16))
            .unwrap();
        let (p, _) = run(&t, &[d(0, 32, false, true), d(100, 1, true, false)]);
        assert_eq!(
            p.action,
            Action::Submit(Request {
                tag: 7,
                op: Op::WriteZeroes,
                flags: FLAG_NO_UNMAP,
                offset: 4096,
                len: 8192
            })
        );
        seg[12..16].copy_from_slice(&0x80u32.to_le_bytes());
        t.guest_memory()
            .write_slice(&seg, GuestAddress(16))
            .unwrap();
        let (p, _) = run(&t, &[d(0, 32, false, true), d(100, 1, true, false)]);
        assert_eq!(p.action, Action::Complete(VIRTIO_BLK_S_UNSUPP as u8));
    }

    #[test]
    fn maps_errno_to_status() {
        assert_eq!(status_of(0), 0);
        assert_eq!(status_of(-libc::EOPNOTSUPP), VIRTIO_BLK_S_UNSUPP as u8);
        assert_eq!(status_of(-libc::EIO), VIRTIO_BLK_S_IOERR as u8);
    }

    const ZONE: u64 = 64 << 10;

    fn zones(max_append_sectors: u32) -> ZoneLimits {
        ZoneLimits {
            zone_size: AtomicU64::new(ZONE),
            max_append_sectors: AtomicU32::new(max_append_sectors),
        }
    }

    fn run_zoned(
        t: &MemTable,
        dev: &DeviceInfo,
        z: Option<&ZoneLimits>,
        descs: &[Desc],
    ) -> (Parsed, Vec<Segment>) {
        let status = check_chain(descs).unwrap();
        let mut segs = vec![];
        let p = parse_with_zones(
            descs,
            status,
            t.guest_memory(),
            t,
            dev,
            z,
            3,
            &mut segs,
            &mut vec![],
        );
        (p, segs)
    }

    fn submitted(op: Op, offset: u64, len: u64) -> Action {
        Action::Submit(Request {
            tag: 3,
            op,
            flags: 0,
            offset,
            len,
        })
    }

    const ZONE_TYPES: [u32; 7] = [
        VIRTIO_BLK_T_ZONE_APPEND,
        VIRTIO_BLK_T_ZONE_REPORT,
        VIRTIO_BLK_T_ZONE_OPEN,
        VIRTIO_BLK_T_ZONE_CLOSE,
        VIRTIO_BLK_T_ZONE_FINISH,
        VIRTIO_BLK_T_ZONE_RESET,
        VIRTIO_BLK_T_ZONE_RESET_ALL,
    ];

    #[test]
    fn zone_requests_are_unsupported_without_zoned() {
        let t = setup();
        let not_zoned = ZoneLimits::default();
        for kind in ZONE_TYPES {
            header(&t, kind, 0);
            let descs = [
                d(0, 16, false, true),
                d(4096, 512, false, true),
                d(8192, 4096, true, true),
                d(100, 1, true, false),
            ];
            // ZONED not negotiated, or negotiated with a graph that is not
            // (or no longer) zoned.
            for z in [None, Some(&not_zoned)] {
                let (p, segs) = run_zoned(&t, &dev(), z, &descs);
                assert_eq!(
                    p.action,
                    Action::Complete(VIRTIO_BLK_S_UNSUPP as u8),
                    "type {kind}"
                );
                assert!(segs.is_empty());
            }
            assert!(is_zone_request(kind));
        }
        assert!(!is_zone_request(VIRTIO_BLK_T_GET_ID));
    }

    #[test]
    fn zone_report_fills_the_writable_buffer() {
        let t = setup();
        let z = zones(128);
        // Any sector inside the first zone to report.
        header(&t, VIRTIO_BLK_T_ZONE_REPORT, 130);
        let (p, segs) = run_zoned(
            &t,
            &dev(),
            Some(&z),
            &[
                d(0, 16, false, true),
                d(4096, 4096, true, true),
                d(0x3000, 64, true, true),
                d(100, 1, true, false),
            ],
        );
        assert_eq!(p.action, submitted(Op::ZoneReport, 130 * 512, 4160));
        assert_eq!(p.used_len, 4161);
        assert_eq!(segs.len(), 2);
        assert_eq!(p.request_type, VIRTIO_BLK_T_ZONE_REPORT);
        // No room for the report header.
        let (p, _) = run_zoned(
            &t,
            &dev(),
            Some(&z),
            &[
                d(0, 16, false, true),
                d(4096, 63, true, true),
                d(100, 1, true, false),
            ],
        );
        assert_eq!(
            p.action,
            Action::Complete(VIRTIO_BLK_S_ZONE_INVALID_CMD as u8)
        );
        // Past the end, or overflowing.
        for sector in [2048, u64::MAX / 256] {
            header(&t, VIRTIO_BLK_T_ZONE_REPORT, sector);
            let (p, _) = run_zoned(
                &t,
                &dev(),
                Some(&z),
                &[
                    d(0, 16, false, true),
                    d(4096, 4096, true, true),
                    d(100, 1, true, false),
                ],
            );
            assert_eq!(
                p.action,
                Action::Complete(VIRTIO_BLK_S_ZONE_INVALID_CMD as u8),
                "sector {sector}"
            );
        }
        // A buffer outside guest memory.
        header(&t, VIRTIO_BLK_T_ZONE_REPORT, 0);
        let (p, _) = run_zoned(
            &t,
            &dev(),
            Some(&z),
            &[
                d(0, 16, false, true),
                d(MEM - 32, 4096, true, true),
                d(100, 1, true, false),
            ],
        );
        assert_eq!(p.action, Action::Complete(VIRTIO_BLK_S_IOERR as u8));
    }

    #[test]
    fn zone_append_takes_readable_data_and_returns_a_sector() {
        let t = setup();
        let z = zones(16);
        let append = |data: u32, tail: u32| {
            vec![
                d(0, 16, false, true),
                d(4096, data, false, true),
                d(8192, tail, true, false),
            ]
        };
        header(&t, VIRTIO_BLK_T_ZONE_APPEND, ZONE / 512);
        let (p, segs) = run_zoned(&t, &dev(), Some(&z), &append(4096, 9));
        assert_eq!(p.action, submitted(Op::ZoneAppend, ZONE, 4096));
        assert_eq!(p.used_len, 9);
        assert_eq!(segs.len(), 1);
        assert_eq!(segs[0].len, 4096);
        // append_sector and status may be split across descriptors.
        let (p, _) = run_zoned(
            &t,
            &dev(),
            Some(&z),
            &[
                d(0, 16 + 512, false, true),
                d(8192, 4, true, true),
                d(9000, 5, true, false),
            ],
        );
        assert_eq!(p.action, submitted(Op::ZoneAppend, ZONE, 512));
        let cases: Vec<(&str, u64, Vec<Desc>, u32)> = vec![
            (
                "not a zone start",
                ZONE / 512 + 8,
                append(4096, 9),
                VIRTIO_BLK_S_ZONE_INVALID_CMD,
            ),
            (
                "past the end",
                MEM / 512,
                append(4096, 9),
                VIRTIO_BLK_S_ZONE_INVALID_CMD,
            ),
            (
                "sector overflows",
                u64::MAX / 256,
                append(4096, 9),
                VIRTIO_BLK_S_ZONE_INVALID_CMD,
            ),
            (
                "more than max_append_sectors",
                0,
                append(8192 + 512, 9),
                VIRTIO_BLK_S_ZONE_INVALID_CMD,
            ),
            ("no data", 0, append(0, 9), VIRTIO_BLK_S_IOERR),
            ("partial sector", 0, append(100, 9), VIRTIO_BLK_S_IOERR),
            (
                "no room for append_sector",
                0,
                append(4096, 1),
                VIRTIO_BLK_S_IOERR,
            ),
            (
                "data in the writable part",
                0,
                append(4096, 4096 + 9),
                VIRTIO_BLK_S_IOERR,
            ),
        ];
        for (what, sector, descs, st) in cases {
            header(&t, VIRTIO_BLK_T_ZONE_APPEND, sector);
            let descs: Vec<Desc> = descs.into_iter().filter(|d| d.len > 0).collect();
            let (p, segs) = run_zoned(&t, &dev(), Some(&z), &descs);
            assert_eq!(p.action, Action::Complete(st as u8), "{what}");
            assert!(segs.is_empty(), "{what}");
        }
        // A device without appends: UNSUPP.
        header(&t, VIRTIO_BLK_T_ZONE_APPEND, 0);
        let (p, _) = run_zoned(&t, &dev(), Some(&zones(0)), &append(4096, 9));
        assert_eq!(p.action, Action::Complete(VIRTIO_BLK_S_UNSUPP as u8));
        // A read-only device: IOERR.
        let ro = dev();
        ro.writable.store(false, Relaxed);
        let (p, _) = run_zoned(&t, &ro, Some(&z), &append(4096, 9));
        assert_eq!(p.action, Action::Complete(VIRTIO_BLK_S_IOERR as u8));
    }

    #[test]
    fn zone_management_acts_on_zone_starts() {
        let t = setup();
        let z = zones(16);
        let descs = [d(0, 16, false, true), d(100, 1, true, false)];
        for (kind, op) in [
            (VIRTIO_BLK_T_ZONE_OPEN, Op::ZoneOpen),
            (VIRTIO_BLK_T_ZONE_CLOSE, Op::ZoneClose),
            (VIRTIO_BLK_T_ZONE_FINISH, Op::ZoneFinish),
            (VIRTIO_BLK_T_ZONE_RESET, Op::ZoneReset),
        ] {
            header(&t, kind, 3 * ZONE / 512);
            let (p, segs) = run_zoned(&t, &dev(), Some(&z), &descs);
            assert_eq!(p.action, submitted(op, 3 * ZONE, 0), "type {kind}");
            assert_eq!(p.used_len, 1);
            assert!(segs.is_empty());
            for bad in [3 * ZONE / 512 + 1, MEM / 512, u64::MAX / 256] {
                header(&t, kind, bad);
                let (p, _) = run_zoned(&t, &dev(), Some(&z), &descs);
                assert_eq!(
                    p.action,
                    Action::Complete(VIRTIO_BLK_S_ZONE_INVALID_CMD as u8),
                    "type {kind} sector {bad}"
                );
            }
        }
        // Reset-all ignores the sector.
        header(&t, VIRTIO_BLK_T_ZONE_RESET_ALL, 12345);
        let (p, _) = run_zoned(&t, &dev(), Some(&z), &descs);
        assert_eq!(p.action, submitted(Op::ZoneResetAll, 0, 0));
        // Changing zones is writing: not on a read-only device.
        let ro = dev();
        ro.writable.store(false, Relaxed);
        for kind in [VIRTIO_BLK_T_ZONE_OPEN, VIRTIO_BLK_T_ZONE_RESET_ALL] {
            header(&t, kind, 0);
            let (p, _) = run_zoned(&t, &ro, Some(&z), &descs);
            assert_eq!(p.action, Action::Complete(VIRTIO_BLK_S_IOERR as u8));
        }
        // A report still works there.
        header(&t, VIRTIO_BLK_T_ZONE_REPORT, 0);
        let (p, _) = run_zoned(
            &t,
            &ro,
            Some(&z),
            &[
                d(0, 16, false, true),
                d(4096, 128, true, true),
                d(100, 1, true, false),
            ],
        );
        assert_eq!(p.action, submitted(Op::ZoneReport, 0, 128));
    }

    #[test]
    fn peeks_at_headers() {
        let t = setup();
        header(&t, VIRTIO_BLK_T_OUT, 77);
        let descs = [
            d(0, 8, false, true),
            d(8, 8 + 512, false, true),
            d(100, 1, true, false),
        ];
        assert_eq!(
            peek_header(&descs, t.guest_memory()),
            Some((VIRTIO_BLK_T_OUT, 77))
        );
        assert_eq!(
            peek_header(&[d(100, 1, true, false)], t.guest_memory()),
            None
        );
    }

    #[test]
    fn zone_results_map_to_zone_statuses_only_when_negotiated() {
        let cases = [
            (zone_status::INVALID_CMD, VIRTIO_BLK_S_ZONE_INVALID_CMD),
            (zone_status::UNALIGNED_WP, VIRTIO_BLK_S_ZONE_UNALIGNED_WP),
            (zone_status::OPEN_RESOURCE, VIRTIO_BLK_S_ZONE_OPEN_RESOURCE),
            (
                zone_status::ACTIVE_RESOURCE,
                VIRTIO_BLK_S_ZONE_ACTIVE_RESOURCE,
            ),
        ];
        for (result, st) in cases {
            assert_eq!(zoned_status_of(result), st as u8);
            assert_eq!(status_of(result), VIRTIO_BLK_S_IOERR as u8);
        }
        assert_eq!(zoned_status_of(0), 0);
        assert_eq!(zoned_status_of(-libc::EIO), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(
            zoned_status_of(-libc::EOPNOTSUPP),
            VIRTIO_BLK_S_UNSUPP as u8
        );
        assert_eq!(zoned_status_of(i32::MIN), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(
            op_kind(VIRTIO_BLK_T_ZONE_APPEND),
            Some(blkmesh_stats::OpKind::Write)
        );
        assert_eq!(op_kind(VIRTIO_BLK_T_ZONE_RESET), None);
    }

    fn put_desc(t: &MemTable, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        t.guest_memory()
            .write_slice(&raw, GuestAddress(table + i as u64 * 16))
            .unwrap();
    }

    #[test]
    fn walks_direct_and_indirect_chains() {
        let t = setup();
        let gm = t.guest_memory();
        let mut out = Vec::new();
        // head 2 -> 5 -> 1 (last writable)
        put_desc(&t, 0x1000, 2, 0x8000, 16, VIRTQ_DESC_F_NEXT, 5);
        put_desc(
            &t,
            0x1000,
            5,
            0x9000,
            512,
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            1,
        );
        put_desc(&t, 0x1000, 1, 0xa000, 1, VIRTQ_DESC_F_WRITE, 0);
        walk_chain(gm, 0x1000, 8, 2, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[1], d(0x9000, 512, true, true));
        assert_eq!(out[2], d(0xa000, 1, true, false));
        // head 3 is an indirect table of two entries.
        put_desc(&t, 0x1000, 3, 0x2000, 32, VIRTQ_DESC_F_INDIRECT, 0);
        put_desc(&t, 0x2000, 0, 0x8000, 16, VIRTQ_DESC_F_NEXT, 1);
        put_desc(&t, 0x2000, 1, 0xa000, 1, VIRTQ_DESC_F_WRITE, 0);
        walk_chain(gm, 0x1000, 8, 3, &mut out).unwrap();
        assert_eq!(
            out,
            vec![d(0x8000, 16, false, true), d(0xa000, 1, true, false)]
        );
    }

    #[test]
    fn refuses_broken_chains() {
        let t = setup();
        let gm = t.guest_memory();
        let mut out = Vec::new();
        assert_eq!(
            walk_chain(gm, 0x1000, 8, 8, &mut out),
            Err(WalkError::Index(8))
        );
        // A loop: 0 -> 1 -> 0.
        put_desc(&t, 0x1000, 0, 0x8000, 16, VIRTQ_DESC_F_NEXT, 1);
        put_desc(&t, 0x1000, 1, 0x8000, 16, VIRTQ_DESC_F_NEXT, 0);
        assert_eq!(walk_chain(gm, 0x1000, 8, 0, &mut out), Err(WalkError::Loop));
        // next out of the table.
        put_desc(&t, 0x1000, 2, 0x8000, 16, VIRTQ_DESC_F_NEXT, 9);
        assert_eq!(
            walk_chain(gm, 0x1000, 8, 2, &mut out),
            Err(WalkError::Index(9))
        );
        // Indirect with NEXT, nested, or of a partial length.
        put_desc(
            &t,
            0x1000,
            3,
            0x2000,
            32,
            VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT,
            0,
        );
        assert_eq!(
            walk_chain(gm, 0x1000, 8, 3, &mut out),
            Err(WalkError::Indirect)
        );
        put_desc(&t, 0x1000, 4, 0x2000, 20, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(
            walk_chain(gm, 0x1000, 8, 4, &mut out),
            Err(WalkError::Indirect)
        );
        put_desc(&t, 0x1000, 5, 0x3000, 16, VIRTQ_DESC_F_INDIRECT, 0);
        put_desc(&t, 0x3000, 0, 0x3000, 16, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(
            walk_chain(gm, 0x1000, 8, 5, &mut out),
            Err(WalkError::Indirect)
        );
        // Table outside guest memory.
        assert_eq!(
            walk_chain(gm, MEM - 8, 8, 0, &mut out),
            Err(WalkError::Unreadable)
        );
        assert_eq!(
            walk_chain(gm, u64::MAX - 8, 8, 1, &mut out),
            Err(WalkError::Unreadable)
        );
    }
}
