//! What a request must be before the worker takes it on: the checks of
//! each ring entry against the graph's size, alignment, zones and
//! read-only state. A request that fails them fails alone, with an errno.

use blkmesh_ipc::ring::{zone_status, Op, Request};

use crate::errno::Errno;
use crate::graph::OpenedGraph;

/// Whether `op` changes the device.
fn writes(op: Op) -> bool {
    matches!(
        op,
        Op::Write
            | Op::Discard
            | Op::WriteZeroes
            | Op::ZoneAppend
            | Op::ZoneOpen
            | Op::ZoneClose
            | Op::ZoneFinish
            | Op::ZoneReset
            | Op::ZoneResetAll
    )
}

/// Checks `req` against the graph.
pub fn check_request(graph: &OpenedGraph, req: &Request) -> Result<(), Errno> {
    if writes(req.op) && graph.read_only() {
        return Err(Errno::EROFS);
    }
    match req.op {
        Op::GetId | Op::Flush => Ok(()),
        Op::Read | Op::Write | Op::Discard | Op::WriteZeroes => check_range(graph, req),
        Op::ZoneReport
        | Op::ZoneOpen
        | Op::ZoneClose
        | Op::ZoneFinish
        | Op::ZoneReset
        | Op::ZoneResetAll
        | Op::ZoneAppend => check_zone_op(graph, req),
    }
}

/// Inside the export and aligned to its request alignment.
fn check_range(graph: &OpenedGraph, req: &Request) -> Result<(), Errno> {
    let l = &graph.limits;
    let end = req.offset.checked_add(req.len).ok_or(Errno::EINVAL)?;
    if end > l.size {
        return Err(Errno::EINVAL);
    }
    let align = l.request_alignment.max(1) as u64;
    if req.offset % align != 0 || req.len % align != 0 {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

/// Checks a zone request against the graph: zoned at all (else
/// EOPNOTSUPP), offset inside and a report buffer that holds at least
/// the header (else ZONE_INVALID_CMD, as virtio-blk has it: a negated
/// errno too, EBADRQC).
fn check_zone_op(graph: &OpenedGraph, req: &Request) -> Result<(), Errno> {
    if graph.zoned.is_none() {
        return Err(Errno::EOPNOTSUPP);
    }
    let l = &graph.limits;
    let invalid = Errno::new(zone_status::INVALID_CMD).unwrap_or(Errno::EINVAL);
    match req.op {
        Op::ZoneResetAll => Ok(()),
        _ if req.offset >= l.size => Err(invalid),
        Op::ZoneReport if req.len < 64 => Err(invalid),
        Op::ZoneAppend if req.len % l.request_alignment.max(1) as u64 != 0 => Err(Errno::EINVAL),
        _ => Ok(()),
    }
}
