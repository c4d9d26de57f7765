//! Parsing a well-shaped chain: its header names the request kind, whose
//! function ([`super::kinds`]) checks the rest.

use std::sync::atomic::Ordering::Relaxed;

use blkmesh_ipc::ring::Segment;
use vm_memory::{ByteValued, GuestMemoryBackend};

use super::chain::{byte_ranges, read_exact, readable, writable, Desc};
use super::kinds::{Action, Chain, Parsed};
use super::limits::{DeviceInfo, ZoneLimits};
use super::wire::{RequestHeader, RequestType, Status, HEADER};
use crate::memory::MemTable;

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

/// Parses a well-shaped chain (see [`super::check_chain`]) into an action, for a
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
    let chain = Chain {
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
